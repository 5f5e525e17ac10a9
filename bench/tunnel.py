"""Throughput, latency and cost of each transport variant, side by side with OpenVPN.

Variants run round-robin (rep 1 of every variant, then rep 2 ...) so that the noise of a shared
machine hits them alike; results are reported as min/median/max and as ratios to the seed's v2
algorithm measured in the same run: the Go program of `seed-go` when it runs, else `seed-v2`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

from bench import report, seed_go
from bench.report import Result, Sample
from bench.testbeds import Testbed, Variant, scratch_dir, testbed
from bench.usage import CpuTimes, LogPosition, peak_rss_mb
from pgvpn_agent.lab import Lab, LabError

RESULTS = Path(__file__).with_name("results")

VARIANTS = (
    Variant("seed-go", "seed v2 in Go: the original design", kind="seed-go", offload=False),
    Variant("seed-v1", "seed v1: trigger, batch 1", mode="trigger", batch_max=1, offload=False),
    Variant("seed-v2", "seed v2: logged, batch 1", mode="logged", batch_max=1, offload=False),
    Variant("payload", "seed cheat: payload", mode="payload", offload=False),
    Variant("logged", "pgvpn logged"),
    Variant("logged-sealed", "pgvpn logged, sealed payloads", encrypt=True),
    Variant("logged-packets", "pgvpn logged, no TUN offload", offload=False),
    Variant("logged-9000", "pgvpn logged, MTU 9000", mtu=9000),
    Variant("openvpn-aes", "OpenVPN 2.6, AES-256-GCM", kind="openvpn", cipher="AES-256-GCM"),
    Variant("openvpn-none", "OpenVPN 2.6, cipher none", kind="openvpn", cipher="none"),
    Variant("veth", "veth pair, no tunnel", kind="veth"),
)
IDLE_PINGS = 50
# The server settings that decide what a commit promises, recorded with every sample.
DURABILITY = ("synchronous_commit", "fsync", "full_page_writes", "wal_sync_method")

# idle pings: every process on the path has gone back to sleep before the next one
PING_INTERVAL = 0.05


def ping_ms(lab: Lab, count: int, back_to_back: bool = False) -> list[float]:
    """Round trips peer1 -> peer2, one per reply: PING_INTERVAL apart, or each as soon as the
    last one's reply is in (`ping -A`: one in flight, never idle between them)."""
    a, b = lab.peers[:2]
    pace = ["-A", "-i", "0"] if back_to_back else ["-i", str(PING_INTERVAL)]
    out = lab.exec(a, ["ping", "-n", "-c", str(count), *pace, "-W", "2", b.ipv4])
    return [float(t) for t in re.findall(r" time=([\d.]+) ms", out.stdout)]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure(variant: Variant, seconds: float, pings: int = IDLE_PINGS) -> Sample:
    """One sample on a fresh testbed: idle pings, then iperf3 with pings alongside, and what
    the tunnel's processes and the database spent while iperf3 ran."""
    workdir = scratch_dir("bench")
    pid = os.getpid()
    with testbed(variant, workdir, prefix=f"pgvb{pid}-", port=57000 + pid % 1000) as bed:
        idle = ping_ms(bed.lab, pings)
        return _under_load(bed, seconds, idle)


def durability(lab: Lab) -> dict[str, str]:
    rows = lab.psql("SELECT name, setting FROM pg_settings WHERE name IN "
                    f"({', '.join(repr(n) for n in DURABILITY)}) ORDER BY name")
    return dict(line.split("|", 1) for line in rows.splitlines())


def _log_position(bed: Testbed) -> LogPosition:
    wal, rows, size = bed.lab.psql(bed.log_position).split("|")
    return LogPosition(int(wal), int(rows), int(size))


def _under_load(bed: Testbed, seconds: float, idle: list[float]) -> Sample:
    lab = bed.lab
    logged = bed.postmaster is not None
    log0 = _log_position(bed) if logged else None
    cpu0 = CpuTimes.of(bed.tunnel_pids, bed.postmaster)
    loaded: list[float] = []
    pinger = threading.Thread(target=lambda: loaded.extend(ping_ms(lab, int(seconds * 10))))
    pinger.start()
    iperf = lab.iperf(lab.peers[0], lab.peers[1], seconds=seconds)
    pinger.join()
    cpu1 = CpuTimes.of(bed.tunnel_pids, bed.postmaster)
    log1 = _log_position(bed) if logged else None
    received = iperf["end"]["sum_received"]
    payload = int(received["bytes"])
    mb = payload / 1e6

    def per_mb(before: float | None, after: float | None) -> float | None:
        return None if before is None or after is None else (after - before) / mb

    growth = None
    if log0 and log1:
        growth = (log1.wal_bytes - log0.wal_bytes + log1.table_bytes - log0.table_bytes) / payload
    return Sample(
        mbits=received["bits_per_second"] / 1e6, payload_bytes=payload,
        rtt_idle_ms=mean(idle), rtt_idle_p50_ms=percentile(idle, 0.5),
        rtt_idle_p99_ms=percentile(idle, 0.99), rtt_load_ms=mean(loaded),
        rtt_load_p50_ms=percentile(loaded, 0.5), rtt_load_p99_ms=percentile(loaded, 0.99),
        rows=log1.rows - log0.rows if log0 and log1 else 0,
        log_bytes_per_byte=growth,
        tunnel_cpu_s_per_mb=per_mb(cpu0.tunnel, cpu1.tunnel) if bed.tunnel_pids else None,
        postgres_cpu_s_per_mb=per_mb(cpu0.postgres, cpu1.postgres),
        peak_rss_mb=max((peak_rss_mb(p) for p in bed.tunnel_pids), default=None),
        durability=durability(lab) if logged else {})


class Progress:
    """One status line on stderr: redrawn every second on a terminal, a line per sample in a
    log (CI), so that neither shows a wall of carriage returns."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.text = ""
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.stop = threading.Event()
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()

    def step(self, variant: Variant, rep: int, reps: int) -> None:
        self.done += 1
        self.text = f"[{self.done}/{self.total}] rep {rep}/{reps}: {variant.name}"
        self._draw(end="" if self.tty else "\n")

    def close(self) -> None:
        self.stop.set()
        if self.tty:
            print(file=sys.stderr)

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            self._draw(end="")

    def _draw(self, end: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        line = f"{self.text}, {elapsed // 60}m{elapsed % 60:02d}s elapsed"
        print(("\r\x1b[K" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def run(variants: tuple[Variant, ...], reps: int, seconds: float,
        pings: int = IDLE_PINGS) -> list[Result]:
    results = [Result(v) for v in variants]
    if any(v.kind == "seed-go" for v in variants):
        seed_go.binary()  # a failed build stops the run before it starts
    progress = Progress(reps * len(variants))
    try:
        for rep in range(1, reps + 1):
            for result in results:
                progress.step(result.variant, rep, reps)
                try:
                    result.samples.append(measure(result.variant, seconds, pings))
                except LabError as exc:
                    raise LabError(f"{result.variant.key}, rep {rep}: {exc}") from exc
    finally:
        progress.close()
    return results


def write(results: list[Result], out: Path, seconds: float, reps: int) -> list[Path]:
    """Markdown, JSON and PNG side by side, named by the run's start time."""
    md, js, png = report.outputs(out, "tunnel")
    md.write_text(report.table(results) + "\n\n" + report.summary(results) + "\n")
    js.write_text(report.to_json(results, seconds, reps) + "\n")
    report.chart(results, png)
    return [md, js, png]


def _selected(only: list[str] | None) -> tuple[Variant, ...]:
    keys = [v.key for v in VARIANTS]
    unknown = sorted(set(only or ()) - set(keys))
    if unknown:
        raise LabError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(keys)}")
    return tuple(v for v in VARIANTS if not only or v.key in only)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pgvpn bench", description=__doc__)
    p.add_argument("--seconds", type=float, help="iperf3 run per sample (default 8, quick 2)")
    p.add_argument("--reps", type=int, help="repetitions of every variant (default 3, quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 s per variant, 1 rep, 20 idle pings")
    p.add_argument("--pings", type=int,
                   help=f"idle pings per sample before iperf3 (default {IDLE_PINGS}, quick 20)")
    p.add_argument("--only", nargs="+", metavar="KEY",
                   help="variants to run: " + ", ".join(v.key for v in VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output dir (default {RESULTS})")
    args = p.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 8.0)
    reps = args.reps or (1 if args.quick else 3)
    pings = args.pings or (20 if args.quick else IDLE_PINGS)
    try:
        results = run(_selected(args.only), reps, seconds, pings)
    except LabError as exc:
        print(f"pgvpn bench: error: {exc}", file=sys.stderr)
        return 2
    print(report.table(results))
    print(report.summary(results))
    for path in write(results, args.out, seconds, reps):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
