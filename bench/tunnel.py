"""Throughput and latency of each transport variant, measured side by side through `pgvpn lab`.

Variants run round-robin (rep 1 of every variant, then rep 2 ...) so that the noise of a shared
machine hits them alike; results are reported as min/median/max and as ratios to the seed's v2
algorithm measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pgvpn_agent.lab import Lab

RESULTS = Path(__file__).with_name("results")


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str = "logged"
    batch_max: int | None = None
    mtu: int = 1500


VARIANTS = (
    Variant("seed v1: trigger, batch 1", mode="trigger", batch_max=1),
    Variant("seed v2: logged, batch 1", mode="logged", batch_max=1),
    Variant("seed cheat: payload", mode="payload"),
    Variant("pgvpn logged", mode="logged"),
    Variant("pgvpn logged, MTU 9000", mode="logged", mtu=9000),
)
BASELINE = "seed v2: logged, batch 1"


@dataclass
class Sample:
    mbits: float
    rtt_idle_ms: float
    rtt_load_ms: float
    rows: int


@dataclass
class Result:
    variant: Variant
    samples: list[Sample] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float, float]:
        values = [getattr(s, key) for s in self.samples]
        return min(values), statistics.median(values), max(values)


def ping_ms(lab: Lab, count: int) -> float:
    a, b = lab.peers[:2]
    out = lab.exec(a, ["ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", "2", b.ipv4])
    match = re.search(r"= [\d.]+/([\d.]+)/", out.stdout)
    return float(match.group(1)) if match else float("nan")


def measure(variant: Variant, seconds: float) -> Sample:
    workdir = Path(tempfile.mkdtemp(prefix="pgvpn-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    lab = Lab.create(workdir, prefix="pgvpn-bench", port=57432, mode=variant.mode,
                     batch_max=variant.batch_max, mtu=variant.mtu)
    try:
        lab.up()
        a, b = lab.peers
        idle = ping_ms(lab, 20)
        load: list[float] = []
        import threading

        pinger = threading.Thread(target=lambda: load.append(ping_ms(lab, int(seconds * 10))))
        pinger.start()
        report = lab.iperf(a, b, seconds=seconds)
        pinger.join()
        rows = int(lab.psql("SELECT count(*) FROM pgvpn.packet"))
        bits = report["end"]["sum_received"]["bits_per_second"]
        return Sample(mbits=bits / 1e6, rtt_idle_ms=idle, rtt_load_ms=load[0], rows=rows)
    finally:
        lab.down()


def run(variants: tuple[Variant, ...], reps: int, seconds: float) -> list[Result]:
    results = [Result(v) for v in variants]
    total = reps * len(variants)
    done = 0
    for rep in range(reps):
        for result in results:
            done += 1
            print(f"[{done}/{total}] rep {rep + 1}: {result.variant.name} ...", end="",
                  file=sys.stderr, flush=True)
            started = time.monotonic()
            sample = measure(result.variant, seconds)
            result.samples.append(sample)
            print(f" {sample.mbits:.1f} Mbit/s, {time.monotonic() - started:.0f}s",
                  file=sys.stderr, flush=True)
    return results


def table(results: list[Result]) -> str:
    base = next((r for r in results if r.variant.name == BASELINE), None)
    base_median = base.stat("mbits")[1] if base else float("nan")
    lines = ["| variant | Mbit/s min / median / max | x seed v2 | ping idle ms | "
             "ping under load ms | rows |", "|---|---|---|---|---|---|"]
    for r in results:
        lo, med, hi = r.stat("mbits")
        lines.append(
            f"| {r.variant.name} | {lo:.1f} / **{med:.1f}** / {hi:.1f} | "
            f"{med / base_median:.1f}x | {r.stat('rtt_idle_ms')[1]:.2f} | "
            f"{r.stat('rtt_load_ms')[1]:.1f} | {int(r.stat('rows')[1])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pgvpn bench", description=__doc__)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 s per variant, one repetition")
    p.add_argument("--only", nargs="*", help="variant names to run (substring match)")
    args = p.parse_args(argv)
    seconds, reps = (2.0, 1) if args.quick else (args.seconds, args.reps)
    variants = tuple(v for v in VARIANTS
                     if not args.only or any(o in v.name for o in args.only))
    results = run(variants, reps, seconds)
    text = table(results)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data: list[dict[str, Any]] = [
        {"variant": asdict(r.variant), "samples": [asdict(s) for s in r.samples]}
        for r in results]
    (RESULTS / f"tunnel-{stamp}.json").write_text(json.dumps(
        {"seconds": seconds, "reps": reps, "results": data}, indent=2))
    (RESULTS / f"tunnel-{stamp}.md").write_text(text + "\n")
    print(f"results in {RESULTS}/tunnel-{stamp}.{{json,md}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
