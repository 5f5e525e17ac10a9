"""`pgvpn bench mesh` outputs: Markdown tables, every sample as JSON, a three-panel PNG.

Figures over repetitions are medians. The targets of issue 17 are ratios within the run:
a mesh against one pair, 8 flows against one, both directions against one.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.mesh import Sample

PHASE_NAMES = {
    "one-flow": "2 peers: one pair, 1 flow",
    "eight-flows": "2 peers: one pair, 8 flows",
    "bidir": "2 peers: one pair, --bidir",
    "openvpn-aes": "OpenVPN AES-256-GCM: 1 flow",
    "idle": "N peers: idle",
    "mesh-one-pair": "N peers: one pair alone",
    "mesh": "N peers: N/2 pairs at once",
    "mesh-bidir": "N peers: N/2 pairs, --bidir",
}
# One pair when issue 17 was filed: 557-560 Mbit/s beside OpenVPN AES-256-GCM's 618 in the
# same run. Held as that ratio, measured in this run, so that no other ratio is met by slowing
# the single pair while a busier hour on a shared machine is not read as a regression.
FLOOR = 0.9
FLOOR_REFERENCE = "openvpn-aes"
PG_GROUPS = ("backends tx", "backends rx", "backends other", "walwriter", "checkpointer",
             "bgwriter", "autovacuum", "postmaster", "walsender", "standby", "other aux",
             "exited")
WAIT_ROLES = ("backends tx", "backends rx")


def _by_phase(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.phase, []).append(s)
    return out


def _probed(samples: list[Sample]) -> dict[str, list[Sample]]:
    """The windows whose costs were sampled: pgvpn's, not OpenVPN's reference."""
    return {k: g for k, g in _by_phase(samples).items() if k != FLOOR_REFERENCE}


def _med(samples: list[Sample], f: Callable[[Sample], float | None]) -> float | None:
    values = [v for s in samples if (v := f(s)) is not None]
    return statistics.median(values) if values else None


def label(key: str, peers: int) -> str:
    return re.sub(r"\bN/2\b|\bN\b", lambda m: str(peers // 2 if m[0] == "N/2" else peers),
                  PHASE_NAMES[key])


def slowest_share(flows: list[float]) -> float | None:
    """The slowest flow over the fair share (their sum over their number)."""
    total = sum(flows)
    return min(flows) / (total / len(flows)) if len(flows) > 1 and total else None


def fairness(s: Sample) -> float | None:
    """The slowest direction over the fair share (the aggregate over the directions)."""
    return slowest_share(s.flows)


def over(v: float | None, reference: float | None) -> float | None:
    return v / reference if v is not None and reference else None


def targets(samples: list[Sample]) -> list[tuple[str, float | None, float, str]]:
    """(target, measured, needed, how it is computed), each ratio within the run."""
    ph = _by_phase(samples)

    def agg(key: str) -> float | None:
        return _med(ph.get(key, []), lambda s: s.mbits)

    one = agg("one-flow")
    bidir_min = _med(ph.get("bidir", []), lambda s: min(s.flows) if s.flows else None)
    return [
        ("mesh aggregate ≥ 0.8x one pair (2-peer lab)", over(agg("mesh"), one), 0.8,
         "N/2 pairs' sum ÷ one flow"),
        ("no mesh pair below half the fair share", _med(ph.get("mesh", []), fairness), 0.5,
         "slowest pair ÷ (sum ÷ pairs)"),
        ("8 parallel flows ≥ 1x one flow", over(agg("eight-flows"), one), 1.0,
         "-P 8 ÷ -P 1"),
        ("--bidir sum ≥ one direction alone", over(agg("bidir"), one), 1.0,
         "both directions ÷ one flow"),
        ("--bidir: neither direction below 0.4x", over(bidir_min, one), 0.4,
         "weaker direction ÷ one flow"),
        (f"floor: one pair ≥ {FLOOR:g}x OpenVPN AES", over(one, agg(FLOOR_REFERENCE)), FLOOR,
         "one flow ÷ OpenVPN AES-256-GCM's one flow (560 ÷ 618 Mbit/s when filed)"),
    ]


def _f(v: float | None, spec: str = "{:.1f}") -> str:
    return "-" if v is None else spec.format(v)


def throughput_table(samples: list[Sample], peers: int) -> str:
    lines = ["| window | Mbit/s in total (median; min-max) | per direction min / median / "
             "max | slowest ÷ fair share | ping under load ms |", "|---|---|---|---|---|"]
    for key, group in _by_phase(samples).items():
        if key == "idle":
            continue
        totals = [s.mbits for s in group]
        flows = [f for s in group for f in s.flows]
        rtts = [p.rtt_load_ms for s in group for p in s.pairs if p.rtt_load_ms is not None]
        lines.append(
            f"| {label(key, peers)} | **{statistics.median(totals):.1f}** "
            f"({min(totals):.1f}-{max(totals):.1f}) | {min(flows):.1f} / "
            f"{statistics.median(flows):.1f} / {max(flows):.1f} | "
            f"{_f(_med(group, fairness), '{:.2f}')} | "
            f"{_f(statistics.median(rtts) if rtts else None)} |")
    return "\n".join(lines)


def targets_table(samples: list[Sample]) -> str:
    lines = ["| target | measured | needed | met | how |", "|---|---|---|---|---|"]
    for what, value, need, how in targets(samples):
        met = "-" if value is None else ("yes" if value >= need else "**no**")
        lines.append(f"| {what} | {_f(value, '{:.2f}x')} | {need:.1f}x | {met} | {how} |")
    return "\n".join(lines)


def cost_table(samples: list[Sample], peers: int) -> str:
    lines = ["| window | CPU cores: agents / postgres / all | MB per CPU-s | commits/s | "
             "batches (NOTIFYs)/s | WAL flushes/s | commits per flush | wake-ups/s notify / "
             "poll | receiver cursor commits/s | batch ms | fetch ms | backends |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, g in _probed(samples).items():
        def m(f: Callable[[Sample], float | None], g: list[Sample] = g) -> float | None:
            return _med(g, f)

        mb_per_cpu = m(lambda s: s.mbits / 8 * s.usage.seconds / s.usage.total_cpu_s
                       if s.usage.total_cpu_s and s.pairs else None)
        lines.append(" | ".join([
            f"| {label(key, peers)}",
            f"{_f(m(lambda s: s.usage.agents_cpu_s / s.usage.seconds), '{:.2f}')} / "
            f"{_f(m(lambda s: s.usage.postgres_cpu_s / s.usage.seconds), '{:.2f}')} / "
            f"{_f(m(lambda s: s.usage.total_cpu_s / s.usage.seconds), '{:.2f}')}",
            _f(mb_per_cpu),
            _f(m(lambda s: s.usage.rate("commits")), "{:.0f}"),
            _f(m(lambda s: s.usage.rate("batches")), "{:.0f}"),
            _f(m(lambda s: s.usage.rate("wal_syncs")), "{:.0f}"),
            _f(m(lambda s: s.usage.counters.get("commits", 0) / s.usage.counters["wal_syncs"]
                 if s.usage.counters.get("wal_syncs") else None), "{:.2f}"),
            f"{_f(m(lambda s: s.usage.rate('wakeups_notify')), '{:.0f}')} / "
            f"{_f(m(lambda s: s.usage.rate('wakeups_poll')), '{:.1f}')}",
            _f(m(lambda s: s.usage.rate("cursor_saves_receiver")), "{:.0f}"),
            _f(m(lambda s: _ms_each(s, "insert_seconds", "batches")), "{:.2f}"),
            _f(m(lambda s: _ms_each(s, "fetch_seconds", "fetches")), "{:.2f}"),
            _f(m(lambda s: float(sum(v for k, v in s.usage.backends.items()
                                     if k.startswith("backends")))), "{:.0f}") + " |"]))
    return "\n".join(lines)


def _ms_each(s: Sample, seconds: str, events: str) -> float | None:
    c = s.usage.counters
    return 1000 * c.get(seconds, 0.0) / c[events] if c.get(events) else None


def postgres_cpu_table(samples: list[Sample], peers: int) -> str:
    lines = ["| window | " + " | ".join(PG_GROUPS) + " | housekeeping |",
             "|---|" + "---|" * (len(PG_GROUPS) + 1)]
    for key, g in _probed(samples).items():
        cells = [_f(_med(g, _cpu_ms(k)), "{:.0f}") for k in (*PG_GROUPS, "housekeeping")]
        lines.append(f"| {label(key, peers)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_ms(group: str) -> Callable[[Sample], float]:
    """A group's CPU in ms per second of the window."""
    return lambda s: 1000 * s.usage.cpu_s.get(group, 0.0) / s.usage.seconds


def wait_shares(samples: list[Sample], role: str) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for s in samples:
        counts.update(s.usage.waits.get(role, {}))
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common()} if total else {}


def waits_table(samples: list[Sample], peers: int) -> str:
    lines = ["| window | " + " | ".join(f"{r}: share of samples" for r in WAIT_ROLES) + " |",
             "|---|" + "---|" * len(WAIT_ROLES)]
    for key, g in _probed(samples).items():
        cells = []
        for role in WAIT_ROLES:
            shares = wait_shares(g, role)
            cells.append(", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:5]) or "-")
        lines.append(f"| {label(key, peers)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def idle_table(samples: list[Sample]) -> str:
    idle = [s for s in samples if s.phase == "idle"]
    if not idle:
        return ""
    n = idle[0].peers

    def per_peer(f: Callable[[Sample], float]) -> tuple[float, float]:
        total = statistics.median(f(s) for s in idle)
        return total / n, total

    rows = [
        ("agents' backends", lambda s: float(sum(s.usage.backends.get(k, 0)
                                                 for k in WAIT_ROLES)), "{:.1f}"),
        ("agent CPU, ms/s", _cpu_ms("agents"), "{:.2f}"),
        ("backends' CPU, ms/s", lambda s: sum(_cpu_ms(k)(s) for k in PG_GROUPS[:3]), "{:.2f}"),
        ("all of PostgreSQL, ms/s", lambda s: 1000 * s.usage.postgres_cpu_s / s.usage.seconds,
         "{:.2f}"),
        ("wake-ups/s (notify + poll)", lambda s: s.usage.rate("wakeups_notify")
         + s.usage.rate("wakeups_poll"), "{:.2f}"),
        ("commits/s", lambda s: s.usage.rate("commits"), "{:.2f}"),
        ("agent RSS, MB", lambda s: s.usage.memory_mb.get("agents RSS", 0.0), "{:.1f}"),
        ("agent PSS, MB", lambda s: s.usage.memory_mb.get("agents PSS", 0.0), "{:.1f}"),
        ("backends' PSS, MB", lambda s: sum(s.usage.memory_mb.get(f"{k} PSS", 0.0)
                                             for k in PG_GROUPS[:3]), "{:.1f}"),
        ("all PostgreSQL PSS, MB", lambda s: sum(v for k, v in s.usage.memory_mb.items()
                                                  if not k.startswith("agents")), "{:.1f}"),
    ]
    lines = [f"| idle, {n} peers | per peer | total |", "|---|---|---|"]
    for what, f, spec in rows:
        each, total = per_peer(f)
        lines.append(f"| {what} | {spec.format(each)} | {spec.format(total)} |")
    rtts = sorted(r for s in idle for r in s.rtt_idle_ms)
    if rtts:
        lines.append(f"| idle ping, {len(rtts)} pairs: median / p90 / max ms | "
                     f"{statistics.median(rtts):.2f} / {rtts[int(0.9 * (len(rtts) - 1))]:.2f} "
                     f"/ {rtts[-1]:.2f} | |")
    return "\n".join(lines)


def db_memory(limit_mb: int | dict[str, int] | None) -> str:
    """How much memory the labs' PostgreSQL had (labmemory): part of every figure."""
    if isinstance(limit_mb, dict):
        sizes = {f"{mb} MB" if mb else "unconfined": n for n, mb in limit_mb.items()}
        return ("PostgreSQL in a memory cgroup of " + " / ".join(
            f"{size} ({n}-peer labs)" for size, n in sizes.items())
            if any(limit_mb.values()) else "PostgreSQL unconfined")
    return f"PostgreSQL in a memory cgroup of {limit_mb} MB" if limit_mb else (
        "PostgreSQL unconfined" if limit_mb == 0 else "PostgreSQL's memory not recorded")


def _memory_note(reporting: str | None, limit_mb: dict[str, int] | None) -> str:
    """Long windows on a machine that hands free memory back to its host measure that too,
    unless the cluster's memory is bounded."""
    if not reporting or not reporting.startswith("on"):
        return f" {db_memory(limit_mb)}." if limit_mb is not None else ""
    if limit_mb and any(limit_mb.values()):
        return (f" {db_memory(limit_mb)}: this machine reports free pages to its host "
                f"({reporting}), and the limit keeps the log's new pages in memory the kernel "
                "reclaims from the cluster's cache, as on a server that has run a while "
                "(pgvpn_agent/labmemory.py).")
    return (f" This machine reports free pages to its host ({reporting}): past the memory it "
            "touched recently, every new page of the log's file cache faults on the host "
            "(`pgvpn bench pagecache`), and a window that outlasts that memory measures it"
            f"{' (PostgreSQL unconfined)' if limit_mb is not None else ''}.")


def markdown(samples: list[Sample], meta: dict[str, Any]) -> str:
    peers = meta["peers"]
    parts = [f"`pgvpn bench mesh --peers {peers}`: {meta['seconds']:g} s per window, "
             f"{meta['reps']} rep(s), started {meta['started']}, load average "
             f"{meta['loadavg_before']:.1f} before, {meta.get('loadavg_after', 0):.1f} after; "
             f"TCP congestion control {meta.get('congestion', 'default')}, "
             f"transport.wake {meta.get('wake', 'in_commit')}"
             f"{', sealed payloads' if meta.get('sealed') else ''}"
             f"{', TCP bursts not joined' if meta.get('join_bursts') is False else ''}"
             f"{', a synchronous standby' if meta.get('standby') else ', one server'}."
             f"{_memory_note(meta.get('free_page_reporting'), meta.get('db_memory_mb'))}",
             throughput_table(samples, peers), targets_table(samples),
             "CPU in cores (CPU-seconds per second), rates per second of the window:",
             cost_table(samples, peers),
             "PostgreSQL CPU by process group, ms per second:",
             postgres_cpu_table(samples, peers),
             "What the agents' backends were doing, sampled every 0.2 s from pg_stat_activity:",
             waits_table(samples, peers), idle_table(samples)]
    return "\n\n".join(p for p in parts if p)


def to_json(samples: list[Sample], meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "samples": [asdict(s) for s in samples],
                       "targets": [{"target": t, "measured": v, "needed": n, "how": h}
                                   for t, v, n, h in targets(samples)]}, indent=2)


def chart(samples: list[Sample], meta: dict[str, Any], path: Path) -> None:
    """Throughput per window (each direction a dot), CPU per group, the senders' waits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = meta["peers"]
    groups = {k: g for k, g in _by_phase(samples).items() if k != "idle"}
    names = [label(k, peers) for k in groups]
    if not groups:  # an idle-only run: its figures are the table's
        fig = plt.figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, f"{peers} peers, idle only: see the Markdown table", ha="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(18, 0.6 * len(groups) + 3.5),
                                           sharey=True)
    totals = [statistics.median(s.mbits for s in g) for g in groups.values()]
    left.barh(names, totals, color="tab:blue", alpha=0.6)
    for y, g in enumerate(groups.values()):
        flows = [f for s in g for f in s.flows]
        left.plot(flows, [y] * len(flows), "k|", markersize=12)
    left.bar_label(left.containers[0], labels=[f"{t:.0f}" for t in totals], padding=3,
                   fontsize=8)
    left.set_xlabel("Mbit/s: total (bar), each direction (ticks)")
    left.invert_yaxis()
    cmap = matplotlib.colormaps["tab20"]
    keys = ["agents", *PG_GROUPS, "housekeeping"]
    start = [0.0] * len(groups)
    for i, k in enumerate(keys):
        vals = [(_med(g, _cpu_ms(k)) or 0.0) / 1000 for g in groups.values()]
        if any(vals):
            mid.barh(names, vals, left=start, label=k, color=cmap(i % 20))
            start = [a + b for a, b in zip(start, vals, strict=True)]
    mid.set_xlabel("CPU cores used, by process group")
    mid.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    events: Counter[str] = Counter()
    shares = [wait_shares(g, "backends tx") for g in groups.values()]
    for sh in shares:
        events.update(sh)
    start = [0.0] * len(groups)
    for i, (event, _) in enumerate(events.most_common(7)):
        vals = [sh.get(event, 0.0) for sh in shares]
        right.barh(names, vals, left=start, label=event, color=cmap((2 * i) % 20))
        start = [a + b for a, b in zip(start, vals, strict=True)]
    right.set_xlabel("senders' backends: share of samples")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.suptitle(f"pgvpn bench mesh: {peers} peers against one pair, {meta['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
