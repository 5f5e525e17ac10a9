"""What a new page of file cache costs this machine, against one already cached.

Every byte pgvpn logs lands in the page cache twice before it reaches the disk: the WAL and the
table (and PostgreSQL 15 extends a table by writing a page of zeros first). On a server whose
free memory is its own, a new cache page costs about what a cached one does. On a virtual
machine whose free memory is handed back to the host (virtio-balloon free page reporting), a
page the guest has not touched since it was reported costs a fault on the host the first time
it is written, and a database that grows its files pays it on every page.

The probe writes a new file in 8 kB writes (a PostgreSQL page) at --rate MB/s, then writes the
first part of it again (cached pages), then deletes it and writes a new file at once (memory
freed a moment ago). Per step of --step MB: system CPU per write, which holds the cost whether
or not the kernel also throttles the writer for dirty pages; free memory and dirty pages.

    .venv/bin/pgvpn bench pagecache --gb 6
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import report
from bench.tunnel import RESULTS

PAGE = 8192
PHASES = ("new file", "cached pages", "memory freed a moment ago")


@dataclass
class Step:
    phase: str
    gb: float  # written in this phase when the step ended
    us_per_page: float  # system CPU per 8 kB write
    free_mb: int
    dirty_mb: int


@dataclass
class Run:
    meta: dict[str, object]
    steps: list[Step] = field(default_factory=list)

    def median(self, phase: str, first: bool, gb: float = 1.0) -> float | None:
        """Median cost of the phase's first (or last) `gb` written."""
        steps = [s for s in self.steps if s.phase == phase]
        end = max((s.gb for s in steps), default=0.0)
        chosen = [s.us_per_page for s in steps if (s.gb <= gb if first else s.gb > end - gb)]
        return statistics.median(chosen) if chosen else None


def _meminfo() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(fields["MemFree"].split()[0]) // 1024, int(fields["Dirty"].split()[0]) // 1024)


def machine() -> dict[str, object]:
    """What decides the result: the hypervisor's free page reporting, the dirty thresholds."""
    order = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    reporting = "no balloon device"
    try:
        for dev in Path("/sys/bus/virtio/devices").glob("*"):
            if (dev / "device").read_text().strip() == "0x0005":  # virtio-balloon
                bits = (dev / "features").read_text().strip()
                on = len(bits) > 5 and bits[5] == "1"  # VIRTIO_BALLOON_F_REPORTING
                reporting = "off" if not on else "on" + (
                    f", blocks of order {order.read_text().strip()} and up"
                    if order.exists() else "")
    except OSError as exc:
        reporting = f"unknown ({exc.strerror})"
    sysctl = {name: Path(f"/proc/sys/vm/{name}").read_text().strip()
              for name in ("dirty_ratio", "dirty_background_ratio", "dirty_bytes",
                           "dirty_background_bytes")}
    return {"free_page_reporting": reporting, "vm": sysctl,
            "mem_total_mb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20}


def write(run: Run, fd: int, phase: str, gb: float, rate: float, step_mb: int) -> None:
    """Write `gb` of 8 kB pages to `fd` from its start at `rate` MB/s (0: at once)."""
    page = b"\x5a" * PAGE
    per_step = step_mb * (1 << 20) // PAGE
    os.lseek(fd, 0, os.SEEK_SET)
    start = time.monotonic()
    for n in range(max(1, round(gb * 1024 / step_mb))):
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        for _ in range(per_step):
            os.write(fd, page)
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_stime - cpu
        free, dirty = _meminfo()
        run.steps.append(Step(phase, round((n + 1) * step_mb / 1024, 3),
                              round(cpu / per_step * 1e6, 2), free, dirty))
        if rate:
            time.sleep(max(0.0, start + (n + 1) * step_mb / rate - time.monotonic()))


@contextmanager
def _scratch(directory: Path) -> Iterator[int]:
    """A new file of our own (O_EXCL: the directory may be /var/tmp), deleted afterwards."""
    fd, name = tempfile.mkstemp(prefix="pgvpn-pagecache-", dir=directory)
    try:
        yield fd
    finally:
        os.close(fd)
        os.unlink(name)


def probe(directory: Path, gb: float, again: float, rate: float, step_mb: int) -> Run:
    run = Run({"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gb": gb, "rate_mb_s": rate,
               "step_mb": step_mb, "directory": str(directory), **machine()})
    with _scratch(directory) as fd:
        write(run, fd, PHASES[0], gb, rate, step_mb)
        write(run, fd, PHASES[1], min(again, gb), rate, step_mb)
    with _scratch(directory) as fd:  # into the memory the first file's cache just gave back
        write(run, fd, PHASES[2], again, rate, step_mb)
    return run


def markdown(run: Run) -> str:
    f = functools.partial(report.fmt, spec="{:.1f}")
    first, last = run.median(PHASES[0], True), run.median(PHASES[0], False)
    cached = run.median(PHASES[1], True, float("inf"))
    freed = run.median(PHASES[2], True)
    lines = [
        f"`pgvpn bench pagecache --gb {run.meta['gb']:g}`: 8 kB writes at "
        f"{run.meta['rate_mb_s']:g} MB/s in {run.meta['directory']}, started "
        f"{run.meta['started']}; free page reporting: {run.meta['free_page_reporting']}.",
        "",
        "| system CPU per 8 kB write, µs (median) | |",
        "|---|---|",
        f"| new file, its first GB | {f(first)} |",
        f"| new file, its last GB | {f(last)} |",
        f"| the same file again (cached pages) | {f(cached)} |",
        f"| a new file in memory freed a moment ago, first GB | {f(freed)} |",
        f"| last GB ÷ cached | {f(last / cached if last and cached else None)}x |",
    ]
    if last and cached:
        pages_per_gb = (1 << 30) // PAGE
        lines.append(f"| the last GB's extra cost: CPU seconds per GB of new cache | "
                     f"{(last - cached) * pages_per_gb / 1e6:.2f} |")
    return "\n".join(lines)


def chart(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for phase in PHASES:
        steps = [s for s in run.steps if s.phase == phase]
        ax.plot([s.gb for s in steps], [s.us_per_page for s in steps], marker=".", label=phase)
    ax.set_xlabel("GB written in the phase")
    ax.set_ylabel("system CPU per 8 kB write, µs")
    ax.set_title(f"A new page of file cache against a cached one "
                 f"(free page reporting: {run.meta['free_page_reporting']})", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pgvpn bench pagecache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=6.0, help="size of the new file (6)")
    p.add_argument("--again", type=float, default=2.0,
                   help="GB written again, and into freed memory (2)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="MB/s, about a busy log's new cache (200; 0: as fast as it goes)")
    p.add_argument("--step", type=int, default=128, help="MB per sample (128)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where the file is written, on the database's filesystem (/var/tmp)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output dir (default {RESULTS})")
    args = p.parse_args(argv)
    if args.gb <= 0 or args.again <= 0 or args.step <= 0 or args.rate < 0:
        p.error("--gb, --again and --step must be positive, --rate 0 or more")
    free = os.statvfs(args.dir)
    if free.f_bavail * free.f_frsize < (args.gb + 1) * (1 << 30):
        print(f"pgvpn bench pagecache: error: {args.dir} has less than {args.gb + 1:g} GB free",
              file=sys.stderr)
        return 2
    run = probe(args.dir, args.gb, args.again, args.rate, args.step)
    text = markdown(run)
    print(text)
    md, js, png = report.outputs(args.out, "pagecache")
    md.write_text(text + "\n")
    js.write_text(json.dumps({"meta": run.meta, "steps": [asdict(s) for s in run.steps]},
                             indent=1) + "\n")
    chart(run, png)
    for out in (md, js, png):
        print(out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
