"""The benchmark's outputs: a Markdown table, the raw samples as JSON and a bar chart (PNG).

Every figure is the median over repetitions; throughput also shows min and max, and ratios are
taken to the seed measured in the same run — its own Go program (`seed-go`) when it ran, else
our Python rendering of its v2 algorithm (`seed-v2`) — so that results from a loaded and a quiet
machine can still be compared.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.testbeds import Variant

SEED_GO = "seed-go"
SEED_V2 = "seed-v2"
DEFAULT = "logged"
OPENVPN_AES = "openvpn-aes"
LOGGING = ("pgvpn", "seed-go")  # the kinds that log rows in the lab's PostgreSQL


@dataclass
class Sample:
    mbits: float
    payload_bytes: int
    rtt_idle_ms: float | None  # mean; then the median and the 99th percentile
    rtt_idle_p50_ms: float | None
    rtt_idle_p99_ms: float | None
    rtt_load_ms: float | None  # while iperf3 ran
    rtt_load_p50_ms: float | None
    rtt_load_p99_ms: float | None
    rows: int  # logged while iperf3 ran
    log_bytes_per_byte: float | None  # WAL + packet-table growth per iperf3 payload byte
    tunnel_cpu_s_per_mb: float | None  # agents, seed-go or OpenVPN; None for the veth pair
    postgres_cpu_s_per_mb: float | None
    peak_rss_mb: float | None  # the largest VmHWM among the tunnel's processes
    # what a commit promises on the server that logged the rows (DURABILITY in bench.tunnel)
    durability: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    variant: Variant
    samples: list[Sample] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [v for s in self.samples if (v := getattr(s, key)) is not None]

    def median(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.median(values) if values else None


def outputs(out: Path, kind: str) -> tuple[Path, Path, Path]:
    """A run's Markdown, JSON and PNG paths in `out` (made if missing), named by its kind and
    the time (UTC) it is written."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    md, js, png = (stem.with_suffix(s) for s in (".md", ".json", ".png"))
    return md, js, png


def baseline(results: list[Result]) -> str:
    """The seed the ratios are taken to: its Go program if it ran, else seed-v2."""
    keys = {r.variant.key for r in results}
    return SEED_GO if SEED_GO in keys else SEED_V2


def ratio(results: list[Result], key: str, to: str) -> float | None:
    """Median throughput of variant `key` over that of variant `to`, if both ran."""
    by_key = {r.variant.key: r.median("mbits") for r in results}
    num, den = by_key.get(key), by_key.get(to)
    return num / den if num is not None and den else None


def table(results: list[Result]) -> str:
    seed = baseline(results)
    lines = [f"| variant | Mbit/s min / median / max | x {seed} | RTT idle avg / p50 / p99 ms | "
             "RTT loaded p50 / p99 ms | rows | log B per payload B | CPU ms/MB tunnel | "
             "CPU ms/MB postgres | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mbits = r.values("mbits")
        lines.append(" | ".join([
            f"| {r.variant.name}",
            f"{min(mbits):.1f} / **{statistics.median(mbits):.1f}** / {max(mbits):.1f}",
            fmt(ratio(results, r.variant.key, seed), "{:.1f}x"),
            " / ".join(fmt(r.median(k), "{:.2f}") for k in
                       ("rtt_idle_ms", "rtt_idle_p50_ms", "rtt_idle_p99_ms")),
            " / ".join(fmt(r.median(k), "{:.1f}") for k in
                       ("rtt_load_p50_ms", "rtt_load_p99_ms")),
            fmt(r.median("rows") if r.variant.kind in LOGGING else None, "{:.0f}"),
            fmt(r.median("log_bytes_per_byte"), "{:.2f}"),
            fmt(_ms(r.median("tunnel_cpu_s_per_mb")), "{:.2f}"),
            fmt(_ms(r.median("postgres_cpu_s_per_mb")), "{:.2f}"),
            fmt(r.median("peak_rss_mb"), "{:.0f}") + " |"]))
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    """The figures the issue sets targets for, in one line each."""
    lines = []
    seed = baseline(results)
    default = next((r for r in results if r.variant.key == DEFAULT), None)
    if default is not None:
        lines.append(f"- `{DEFAULT}` (MTU {default.variant.mtu}): "
                     f"{fmt(ratio(results, DEFAULT, seed), '{:.1f}x')} {seed}, "
                     f"{fmt(ratio(results, DEFAULT, OPENVPN_AES), '{:.2f}x')} OpenVPN AES")
    rss = [max(r.values("peak_rss_mb")) for r in results
           if r.variant.kind == "pgvpn" and r.values("peak_rss_mb")]
    if rss:
        lines.append(f"- agent peak RSS: {max(rss):.0f} MB (largest of any agent in any run)")
    settings: dict[str, list[str]] = {}
    for r in results:
        for s in r.samples:
            if s.durability:
                text = ", ".join(f"{k} = {v}" for k, v in sorted(s.durability.items()))
                settings.setdefault(text, []).append(r.variant.key)
    for text, keys in settings.items():
        which = "every logged sample" if len(settings) == 1 else ", ".join(dict.fromkeys(keys))
        lines.append(f"- PostgreSQL durability ({which}): {text}")
    return "\n".join(lines)


def to_json(results: list[Result], seconds: float, reps: int) -> str:
    seed = baseline(results)
    data: list[dict[str, Any]] = [
        {"variant": asdict(r.variant), "samples": [asdict(s) for s in r.samples],
         "x_seed": ratio(results, r.variant.key, seed),
         "x_seed_v2": ratio(results, r.variant.key, SEED_V2)} for r in results]
    return json.dumps({"seconds": seconds, "reps": reps, "seed": seed, "results": data},
                      indent=2)


def chart(results: list[Result], path: Path) -> None:
    """Throughput relative to the seed (log scale) beside the CPU each variant spends per MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.variant.name for r in results]
    colors = ["tab:gray" if r.variant.kind != "pgvpn" else "tab:blue" for r in results]
    seed = baseline(results)
    ratios = [ratio(results, r.variant.key, seed) or 0.0 for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.55 * len(results) + 2),
                                      sharey=True)
    mbits = [r.median("mbits") or 0.0 for r in results]
    if any(ratios):
        bars = left.barh(names, ratios, color=colors)
        left.bar_label(bars, labels=[f"{x:.1f}x ({m:.0f} Mbit/s)"
                                     for x, m in zip(ratios, mbits, strict=True)],
                       padding=3, fontsize=8)
        left.set_xscale("log")
        left.set_xlim(right=max(ratios) * 30)  # room for the labels
        left.set_xlabel(f"median throughput, x {seed}, log scale")
    else:  # no seed variant ran (--only): Mbit/s on a linear scale, nothing to divide by
        bars = left.barh(names, mbits, color=colors)
        left.bar_label(bars, labels=[f"{m:.0f} Mbit/s" for m in mbits], padding=3, fontsize=8)
        left.set_xlim(right=max(mbits, default=1.0) * 1.3)
        left.set_xlabel("median throughput, Mbit/s (no seed variant in this run)")
    left.invert_yaxis()
    tunnel = [_ms(r.median("tunnel_cpu_s_per_mb")) or 0.0 for r in results]
    database = [_ms(r.median("postgres_cpu_s_per_mb")) or 0.0 for r in results]
    right.barh(names, tunnel, color=colors, label="agents / seed-go / OpenVPN")
    right.barh(names, database, left=tunnel, color="tab:orange", label="PostgreSQL")
    right.set_xscale("symlog", linthresh=1.0)
    right.set_xlabel("CPU ms per MB transferred, median")
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle("pgvpn bench: iperf3 TCP through each transport (blue: pgvpn, gray: baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def fmt(value: float | None, spec: str) -> str:
    """A table cell: "-" for a figure that was not measured."""
    return "-" if value is None else spec.format(value)
