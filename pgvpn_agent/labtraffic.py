"""Traffic through a lab: which paths `up` checks before it returns, pings in parallel, iperf3."""

from __future__ import annotations

import json
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgvpn_agent.labhost import LabError

if TYPE_CHECKING:
    from pgvpn_agent.lab import Lab, LabPeer

# Labs up to this size check every ordered pair of peers; bigger ones check each peer with
# CHECKED_OTHERS random others, both ways (a full mesh of 50 peers is 4,900 paths).
FULL_CHECK = 10
CHECKED_OTHERS = 3
PING_WORKERS = 8

Check = tuple["LabPeer", "LabPeer", bool]  # from, to, over IPv6


def mesh_checks(peers: list[LabPeer], seed: int = 0) -> list[Check]:
    if len(peers) <= FULL_CHECK:
        pairs = [(a, b) for a in peers for b in peers if a is not b]
    else:
        rng = random.Random(seed)
        chosen: dict[tuple[str, str], tuple[LabPeer, LabPeer]] = {}
        for a in peers:
            for b in rng.sample([p for p in peers if p is not a], CHECKED_OTHERS):
                chosen[a.name, b.name] = (a, b)
                chosen[b.name, a.name] = (b, a)
        pairs = list(chosen.values())
    return [(a, b, v6) for a, b in pairs for v6 in (False, True)]


def unreachable(lab: Lab, checks: list[Check]) -> list[Check]:
    """The checks whose ping gets no answer, run a few at once."""
    with ThreadPoolExecutor(PING_WORKERS) as pool:
        ok = list(pool.map(lambda c: lab.ping(c[0], c[1], v6=c[2]), checks))
    return [c for c, answered in zip(checks, ok, strict=True) if not answered]


def congestion_control(chosen: str | None) -> str:
    """The flows' congestion control as a report names it: the kernel's default differs
    between machines (cubic on one, bbr on another) and changes the mesh's figures."""
    if chosen:
        return chosen
    try:
        default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        default = "unknown"
    return f"{default} (the kernel's default)"


def iperf(lab: Lab, src: LabPeer, dst: LabPeer, seconds: float = 3, streams: int = 1,
          reverse: bool = False, bidir: bool = False,
          congestion: str | None = None) -> dict[str, Any]:
    """iperf3 TCP from src to dst (both ways with bidir); returns iperf3's JSON report.
    `congestion`: the flows' TCP congestion control (iperf3 -C), else the kernel's default."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", dst.netns, "iperf3", "-s", "-1", "-B", dst.ipv4],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if lab.exec(dst, ["ss", "-ltn", f"src {dst.ipv4}:5201"]).stdout.count("LISTEN"):
                break
            time.sleep(0.1)
        cmd = ["iperf3", "-J", "-c", dst.ipv4, "-t", str(seconds), "-P", str(streams)]
        cmd += (["-R"] if reverse else []) + (["--bidir"] if bidir else [])
        cmd += ["-C", congestion] if congestion else []
        out = lab.exec(src, cmd, timeout=seconds + 60)
        report: dict[str, Any] = json.loads(out.stdout or "{}")
        if out.returncode != 0 or "error" in report:
            raise LabError(f"iperf3 failed: {report.get('error', out.stderr.strip())}")
        return report
    finally:
        server.kill()
        server.wait()
