"""`pgvpn bench mesh`: many peers at once, against one pair, side by side in one run.

Windows, round-robin in every repetition: on a 2-peer lab the references (one TCP flow, 8
parallel flows, both directions at once), OpenVPN with AES-256-GCM between two namespaces (the
floor's reference: one flow), and on an N-peer lab idle pings across all pairs, an idle window,
one pair alone among N peers, then N/2 disjoint pairs at once, one way and with `--bidir`.
Every window has a fresh lab and starts with the machine's page cache written back: a lab that
has just logged a few GB runs its next window at 0.5-0.7x of its first (docs/scale.md: the
heap written since the last checkpoint slows the log), which would favour whichever window
comes first. Every pgvpn window is sampled by `bench.probe`: CPU per
process group, what the backends wait for, commits, WAL flushes, batches (one NOTIFY each) and
wake-ups. The issue's targets come out as ratios taken within the run, so a loaded machine
still compares like with like.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import meshreport, pagecache, report
from bench.probe import Probe, Usage
from bench.testbeds import Variant, scratch_dir, testbed
from bench.tunnel import RESULTS, VARIANTS, Progress
from pgvpn_agent import labmemory, labtraffic
from pgvpn_agent.config import WAKES, Transport
from pgvpn_agent.lab import Lab, LabError, LabPeer
from pgvpn_agent.labstandby import Standby

OPENVPN_AES = next(v for v in VARIANTS if v.key == "openvpn-aes")
SETTLE = 2.0  # seconds between windows: the previous one's queues drain
IDLE_PINGS = 3
# idle pings run two at a time: more would queue behind each other's commits and measure that
IDLE_PING_WORKERS = 2


@dataclass(frozen=True)
class Phase:
    key: str
    lab: str  # "two" | "mesh" | "openvpn" (two namespaces, no database)
    pairs: int  # 0: idle; -1: N/2
    streams: int = 1
    bidir: bool = False


PHASES = (
    Phase("one-flow", "two", pairs=1),
    Phase("eight-flows", "two", pairs=1, streams=8),
    Phase("bidir", "two", pairs=1, bidir=True),
    Phase("openvpn-aes", "openvpn", pairs=1),
    Phase("idle", "mesh", pairs=0),
    Phase("mesh-one-pair", "mesh", pairs=1),
    Phase("mesh", "mesh", pairs=-1),
    Phase("mesh-bidir", "mesh", pairs=-1, bidir=True),
)


@dataclass
class PairRun:
    src: str
    dst: str
    mbits: float  # src -> dst, as received
    mbits_reverse: float | None  # dst -> src, with --bidir
    rtt_load_ms: float | None
    per_second: list[float] = field(default_factory=list)  # src -> dst, iperf3's intervals
    retransmits: int = 0  # src -> dst, iperf3's count


@dataclass
class Sample:
    phase: str
    rep: int
    peers: int  # in the lab
    pairs: list[PairRun]
    usage: Usage
    rtt_idle_ms: list[float] = field(default_factory=list)  # one per pinged pair

    @property
    def mbits(self) -> float:
        return sum(p.mbits + (p.mbits_reverse or 0.0) for p in self.pairs)

    @property
    def flows(self) -> list[float]:
        """Every direction's throughput: a pair's, and its reverse with --bidir."""
        out = [p.mbits for p in self.pairs]
        return out + [p.mbits_reverse for p in self.pairs if p.mbits_reverse is not None]


def ping_avg(lab: Lab, src: LabPeer, dst: LabPeer, count: int, interval: float) -> float | None:
    out = lab.exec(src, ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2",
                         dst.ipv4])
    match = re.search(r"= [\d.]+/([\d.]+)/", out.stdout)
    return float(match.group(1)) if match else None


def idle_pings(lab: Lab) -> list[float]:
    """Average RTT of every ordered pair (labs of up to FULL_CHECK peers), or of the paths
    `lab up` checks in a bigger one; a few pairs at a time."""
    checks = labtraffic.mesh_checks(lab.peers)
    pairs = list({(a.name, b.name): (a, b) for a, b, _ in checks}.values())
    with ThreadPoolExecutor(IDLE_PING_WORKERS) as pool:
        rtts = pool.map(lambda ab: ping_avg(lab, ab[0], ab[1], IDLE_PINGS, 0.05), pairs)
        return [r for r in rtts if r is not None]


def run_pairs(lab: Lab, pairs: list[tuple[LabPeer, LabPeer]], phase: Phase,
              seconds: float, congestion: str | None) -> list[PairRun]:
    """iperf3 on every pair at once, each with a ping alongside (10 a second)."""
    results: list[PairRun | None] = [None] * len(pairs)
    errors: list[BaseException] = []

    def one(i: int, a: LabPeer, b: LabPeer) -> None:
        rtt: list[float | None] = []
        pinger = threading.Thread(target=lambda: rtt.append(
            ping_avg(lab, a, b, max(1, int(seconds * 10) - 5), 0.1)))
        pinger.start()
        try:
            report = lab.iperf(a, b, seconds=seconds, streams=phase.streams, bidir=phase.bidir,
                               congestion=congestion)
        except BaseException as exc:
            errors.append(exc)
            return
        finally:
            pinger.join()
        end = report["end"]
        reverse = end.get("sum_received_bidir_reverse") if phase.bidir else None
        results[i] = PairRun(
            a.name, b.name, end["sum_received"]["bits_per_second"] / 1e6,
            reverse["bits_per_second"] / 1e6 if reverse else None, rtt[0],
            [iv["sum"]["bits_per_second"] / 1e6 for iv in report.get("intervals", [])],
            int(end["sum_sent"].get("retransmits", 0)))

    threads = [threading.Thread(target=one, args=(i, a, b)) for i, (a, b) in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise LabError(f"{phase.key}: {errors[0]}")
    return [r for r in results if r is not None]


def measure(lab: Lab, phase: Phase, rep: int, seconds: float, idle_s: float,
            congestion: str | None = None) -> Sample:
    pairs = [(lab.peers[i], lab.peers[i + 1]) for i in range(0, len(lab.peers) - 1, 2)]
    pairs = pairs[:phase.pairs] if phase.pairs >= 0 else pairs
    rtts = idle_pings(lab) if not pairs else []
    os.sync()  # nothing of the previous window's writes left for this one to wait behind
    time.sleep(SETTLE)
    if phase.lab == "openvpn":  # no database, no agents: the throughput alone
        started = time.monotonic()
        runs = run_pairs(lab, pairs, phase, seconds, congestion)
        return Sample(phase.key, rep, 2, runs,
                      Usage(time.monotonic() - started, {}, {}, {}, {}))
    probe = Probe(lab, memory=not pairs)
    probe.start()
    if pairs:
        runs = run_pairs(lab, pairs, phase, seconds, congestion)
    else:
        runs = []
        time.sleep(idle_s)
    return Sample(phase.key, rep, len(lab.peers), runs, probe.stop(), rtts)


@contextmanager
def bed_of(phase: Phase, peers: int, options: dict[str, Any]) -> Iterator[Lab]:
    """A fresh lab for one window: 2 or N peers with agents, or OpenVPN's two namespaces."""
    if phase.lab != "openvpn":
        with lab_of(2 if phase.lab == "two" else peers, phase.lab[0], **options) as lab:
            yield lab
        return
    with testbed(OPENVPN_AES, _workdir(), _prefix("o"), _port(2)) as bed:
        yield bed.lab


def _workdir() -> Path:
    workdir = scratch_dir("mesh")
    return workdir


def _prefix(tag: str) -> str:
    return f"pgvm{os.getpid() % 10000}{tag}-"


def _port(peers: int) -> int:
    return 58000 + (os.getpid() * 7 + peers) % 1000


@contextmanager
def lab_of(peers: int, tag: str, standby: bool = False, db_memory: int | None = None,
           **options: Any) -> Iterator[Lab]:
    """A lab of `peers`; `options` go to Lab.create (encrypt, join_bursts, db_clock). With
    `standby`, every commit waits for a synchronous standby's flush as well. The cluster
    runs in `db_memory` MB (None: labmemory's size for `peers`; 0: unconfined)."""
    lab = Lab.create(_workdir(), peers=peers, prefix=_prefix(tag), port=_port(peers),
                     db_memory_mb=lab_memory(db_memory, peers),
                     **options)
    try:
        lab.up()
        if standby:
            Standby(lab).create()
        yield lab
    finally:
        lab.down()


def run(peers: int, reps: int, seconds: float, idle_s: float, phases: tuple[Phase, ...],
        congestion: str | None = None, lab_options: dict[str, Any] | None = None
        ) -> list[Sample]:
    samples: list[Sample] = []
    progress = Progress(reps * len(phases))
    try:
        for rep in range(1, reps + 1):
            for phase in phases:
                progress.step(Variant(phase.key, meshreport.label(phase.key, peers)), rep, reps)
                with bed_of(phase, peers, lab_options or {}) as lab:
                    samples.append(measure(lab, phase, rep, seconds, idle_s, congestion))
    finally:
        progress.close()
    return samples


def add_db_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db-memory", type=int, metavar="MB",
                   help="the labs' PostgreSQL in a memory cgroup of MB (default "
                        f"{labmemory.CACHE_MB} + {labmemory.PEER_MB} per peer: a server whose "
                        "memory is full of cache, pgvpn_agent/labmemory.py; 0: unconfined, "
                        "on a machine that hands free memory to its host the log then "
                        "measures that)")


def lab_memory(option: int | None, peers: int) -> int:
    """A lab's database memory limit in MB from `--db-memory` (None: labmemory's size)."""
    return labmemory.size_mb(peers) if option is None else option


def db_memory_mb(option: int | None, peers: int) -> dict[str, int]:
    """What the report says of the labs' limits: per lab size, in MB (0: none)."""
    return {str(n): lab_memory(option, n) for n in sorted({2, peers})}


def write(samples: list[Sample], out: Path, meta: dict[str, Any]) -> list[Path]:
    md, js, png = report.outputs(out, "mesh")
    md.write_text(meshreport.markdown(samples, meta) + "\n")
    js.write_text(meshreport.to_json(samples, meta) + "\n")
    meshreport.chart(samples, meta, png)
    return [md, js, png]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pgvpn bench mesh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=10, help="peers in the mesh lab (default 10)")
    p.add_argument("--seconds", type=float, default=8.0, help="iperf3 run per window (8)")
    p.add_argument("--idle", type=float, default=10.0, help="idle window, seconds (10)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of every window (1)")
    p.add_argument("--only", nargs="+", metavar="KEY",
                   help="windows to run: " + ", ".join(ph.key for ph in PHASES))
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output dir (default {RESULTS})")
    p.add_argument("--congestion", metavar="ALGORITHM",
                   help="the iperf3 flows' TCP congestion control (iperf3 -C), e.g. reno: "
                        "what the tunnel carries when the flows' own ramp-up is not the limit "
                        "(default: the kernel's)")
    p.add_argument("--wake", choices=WAKES,
                   help="the agents' transport.wake (default: theirs, auto)")
    p.add_argument("--sealed", action="store_true",
                   help="labs with [encryption]: small batches ride in their notification")
    p.add_argument("--no-join", action="store_true",
                   help="agents with tun.join_bursts = false: each TCP burst its own row")
    p.add_argument("--standby", action="store_true",
                   help="every lab with a synchronous streaming standby: each commit waits "
                        "for its flush as well, the notification lock held through it")
    add_db_memory(p)
    args = p.parse_args(argv)
    unknown = set(args.only or ()) - {ph.key for ph in PHASES}
    if unknown or args.peers < 4:
        p.error(f"unknown window {', '.join(sorted(unknown))}" if unknown
                else "--peers: at least 4 (two pairs)")
    phases = tuple(ph for ph in PHASES if not args.only or ph.key in args.only)
    meta = {"peers": args.peers, "seconds": args.seconds, "idle_seconds": args.idle,
            "reps": args.reps, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "loadavg_before": os.getloadavg()[0],
            "congestion": labtraffic.congestion_control(args.congestion),
            "wake": args.wake or Transport.wake, "sealed": args.sealed,
            "join_bursts": not args.no_join, "standby": args.standby,
            "free_page_reporting": pagecache.machine()["free_page_reporting"],
            "db_memory_mb": db_memory_mb(args.db_memory, args.peers)}
    try:
        samples = run(args.peers, args.reps, args.seconds, args.idle, phases,
                      args.congestion, {"encrypt": args.sealed, "join_bursts": not args.no_join,
                                        "standby": args.standby,
                                        "db_memory": args.db_memory,
                                        **({"transport": {"wake": args.wake}} if args.wake
                                           else {})})
    except LabError as exc:
        print(f"pgvpn bench mesh: error: {exc}", file=sys.stderr)
        return 2
    meta["loadavg_after"] = os.getloadavg()[0]
    print(meshreport.markdown(samples, meta))
    for path in write(samples, args.out, meta):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
