"""`pgvpn bench mesh-long` outputs: what each event cost the mesh, per segment figures, a chart.

An event's cost is read off the aggregate throughput per second: the mean over the SPAN
seconds before it, the worst second and the mean over the SPAN seconds from it, and how long
until a second was back at RECOVERED of the mean before.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import report
from bench.meshreport import db_memory, slowest_share

if TYPE_CHECKING:
    from bench.meshlong import LongRun
    from bench.probe import Usage

SERVER_CHECKPOINT = "checkpoint by the server"  # bench.meshlong's name for them
SPAN = 10  # seconds either side of an event
RECOVERED = 0.9


@dataclass
class Impact:
    before: float | None  # mean Mbit/s over the SPAN seconds before
    worst: float | None  # the lowest second in the SPAN seconds from the event
    after: float | None  # mean over the SPAN seconds from the event
    recovered_s: float | None  # seconds from the event to a second >= RECOVERED x before


def aggregate(per_pair: list[list[float]]) -> list[float]:
    """The mesh's throughput per second: every pair's second i, summed (a pair whose iperf3
    reported fewer seconds counts 0 for the rest)."""
    length = max((len(p) for p in per_pair), default=0)
    return [sum(p[i] for p in per_pair if i < len(p)) for i in range(length)]


def impact(series: list[float], at: float, span: int = SPAN) -> Impact:
    """What the event at second `at` did to a per-second series (second i covers [i, i+1))."""
    i = int(at)
    before = series[max(0, i - span):i]
    after = series[i:i + span]
    mean_before = statistics.fmean(before) if before else None
    recovered = None
    if mean_before is not None:
        recovered = next((float(j - i) for j in range(i, len(series))
                          if series[j] >= RECOVERED * mean_before), None)
    return Impact(mean_before, min(after) if after else None,
                  statistics.fmean(after) if after else None, recovered)


def standby(meta: dict[str, Any]) -> str:
    """What the run's commits waited for, as the primary reported it at the end."""
    if not meta.get("standby"):
        return "one server"
    return f"a standby (pg_stat_replication.sync_state at the end: {meta.get('replication')})"


def _f(v: float | None, spec: str = "{:.1f}") -> str:
    return "-" if v is None else spec.format(v)


def _top_wait(usage: Usage, role: str = "backends tx") -> str:
    waits = usage.waits.get(role, {})
    total = sum(waits.values())
    busy = {k: v for k, v in waits.items() if k != "idle"}
    if not total or not busy:
        return "-"
    name, n = max(busy.items(), key=lambda kv: kv[1])
    return f"{name} {100 * n / total:.0f}%"


def segments_table(run: LongRun, series: list[float]) -> str:
    rows = ["| from s | Mbit/s (mean of its seconds) | CPU cores agents / postgres | "
            "checkpointer + autovacuum ms/s | WAL MB/s | WAL flushes/s | batches/s | "
            "senders' backends, top wait |", "|---|---|---|---|---|---|---|---|"]
    for seg in run.segments:
        u = seg.usage
        if u.seconds <= 0:
            continue
        first, last = int(seg.start), int(seg.start + u.seconds)
        mbits = statistics.fmean(series[first:last]) if series[first:last] else None
        aux = (u.cpu_s.get("checkpointer", 0.0) + u.cpu_s.get("autovacuum", 0.0)) / u.seconds
        rows.append(
            f"| {seg.start:.0f} | {_f(mbits)} | {u.agents_cpu_s / u.seconds:.2f} / "
            f"{u.postgres_cpu_s / u.seconds:.2f} | {1000 * aux:.0f} | "
            f"{u.rate('wal_bytes') / 1e6:.1f} | {u.rate('wal_syncs'):.0f} | "
            f"{u.rate('batches'):.0f} | {_top_wait(u)} |")
    return "\n".join(rows)


def markdown(run: LongRun) -> str:
    series = aggregate([p.per_second for p in run.pairs])
    meta = run.meta
    head = (f"`pgvpn bench mesh-long --peers {run.peers} --seconds {run.seconds:g}`: "
            f"{len(run.pairs)} pairs at once, started {meta.get('started', '?')}, load average "
            f"{meta.get('loadavg_before', 0):.1f} before, {meta.get('loadavg_after', 0):.1f} "
            f"after; {standby(meta)}; TCP "
            f"congestion control {meta.get('congestion', 'default')}; "
            f"{db_memory(meta.get('db_memory_mb'))}.")
    steady = sorted(series)
    mean = statistics.fmean(series) if series else None
    summary = [
        "| over the run | |", "|---|---|",
        f"| Mbit/s in total: mean of its seconds | {_f(mean)} |",
        f"| a second's total: p10 / median / p90 | "
        f"{_f(steady[len(steady) // 10] if steady else None)} / "
        f"{_f(statistics.median(steady) if steady else None)} / "
        f"{_f(steady[9 * len(steady) // 10] if steady else None)} |",
        *([f"| the first pair alone before the run, same lab: Mbit/s; the run's mean ÷ it | "
           f"{run.reference.mbits:.1f}; "
           f"{_f(mean / run.reference.mbits if mean is not None else None, '{:.2f}x')} |"]
          if run.reference is not None and run.reference.mbits > 0 else []),
        f"| per pair, Mbit/s | {' / '.join(f'{p.mbits:.1f}' for p in run.pairs)} |",
        f"| slowest pair ÷ fair share | "
        f"{_f(slowest_share([p.mbits for p in run.pairs]), '{:.2f}')} |",
        f"| TCP retransmissions, all pairs | {sum(p.retransmits for p in run.pairs)} |",
        f"| packets dropped by the agents | "
        f"{', '.join(f'{k} {v:.0f}' for k, v in sorted(run.dropped.items())) or 'none'} |",
        f"| rows logged, by day (database clock) | "
        f"{', '.join(f'{d}: {n}' for d, n in run.rows_by_day.items()) or 'none'} |",
        f"| checkpoints requested in the run | {meta.get('checkpoints_requested', '-')} |",
    ]
    events = ["| event | at s | took s | Mbit/s before | worst second after | mean after | "
              f"back to {RECOVERED:.0%} after s |", "|---|---|---|---|---|---|---|"]
    for e in run.events:
        if e.name == SERVER_CHECKPOINT:
            continue
        im = impact(series, e.at)
        took = f"{e.seconds:.2f}" if e.seconds else "-"
        events.append(f"| {e.name}{f' ({e.detail})' if e.detail else ''} | {e.at:.1f} | "
                      f"{took} | {_f(im.before)} | {_f(im.worst)} | {_f(im.after)} | "
                      f"{_f(im.recovered_s, '{:.0f}')} |")
    own = [impact(series, e.at) for e in run.events if e.name == SERVER_CHECKPOINT]
    if own:
        def med(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return statistics.median(known) if known else None
        whys = sorted({e.detail for e in run.events if e.name == SERVER_CHECKPOINT})
        events.append(
            f"| {len(own)} checkpoints the server started ({', '.join(whys)}): medians | - | - "
            f"| {_f(med([i.before for i in own]))} | {_f(med([i.worst for i in own]))} | "
            f"{_f(med([i.after for i in own]))} | "
            f"{_f(med([i.recovered_s for i in own]), '{:.0f}')} |")
    return "\n\n".join([head, "\n".join(summary), "\n".join(events),
                        f"Every {meta.get('segment', 10):g} s (CPU in cores, rates per second):",
                        segments_table(run, series)])


def to_json(run: LongRun) -> str:
    series = aggregate([p.per_second for p in run.pairs])
    return json.dumps({**asdict(run), "aggregate_per_second": series,
                       "impacts": {e.name: asdict(impact(series, e.at)) for e in run.events}},
                      indent=2)


def chart(run: LongRun, path: Path) -> None:
    """Throughput per second (the total, each pair) with the events marked; CPU per segment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = aggregate([p.per_second for p in run.pairs])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 8), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for p in run.pairs:
        top.plot(range(len(p.per_second)), p.per_second, linewidth=0.7, alpha=0.7,
                 label=f"{p.src}→{p.dst}")
    top.plot(range(len(series)), series, color="black", linewidth=1.4, label="all pairs")
    for e in run.events:
        if e.name == SERVER_CHECKPOINT:
            top.axvline(e.at, color="grey", linestyle=":", linewidth=0.8)
            continue
        for ax in (top, bottom):
            ax.axvline(e.at, color="tab:red", linestyle="--", linewidth=0.9)
        top.annotate(e.name, (e.at, top.get_ylim()[1] if series else 1), rotation=90,
                     va="top", ha="right", fontsize=8, color="tab:red")
    top.set_ylabel("Mbit/s per second (grey dotted: the server's own checkpoints)")
    top.legend(fontsize=7, ncol=6, loc="lower left")
    starts = [s.start for s in run.segments if s.usage.seconds > 0]
    agents = [s.usage.agents_cpu_s / s.usage.seconds for s in run.segments if s.usage.seconds > 0]
    pg = [s.usage.postgres_cpu_s / s.usage.seconds for s in run.segments if s.usage.seconds > 0]
    bottom.stackplot(starts, agents, pg, labels=["agents", "PostgreSQL"], step="post", alpha=0.7)
    bottom.set_ylabel("CPU cores")
    bottom.set_xlabel("seconds into the run")
    bottom.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"pgvpn bench mesh-long: {run.peers} peers, {len(run.pairs)} pairs, "
                 f"{run.meta.get('started', '')}"
                 f"{', synchronous standby' if run.meta.get('standby') else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(run: LongRun, out: Path) -> list[Path]:
    md, js, png = report.outputs(out, "mesh-long")
    md.write_text(markdown(run) + "\n")
    js.write_text(to_json(run) + "\n")
    chart(run, png)
    return [md, js, png]
