"""`pgvpn bench rtt`'s outputs: a Markdown table, every sample as JSON, a stacked-bar chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench import report
from bench.rttstages import KERNEL, STAGES
from bench.tunnel import percentile

DIRECTIONS = (("out", "echo request"), ("back", "echo reply"))
LEGEND = {"sender": "sender agent", "commit": "commit and wake-up", "receiver": "receiver agent",
          "fetch": "fetch", "deliver": "delivery", "kernel": "echo (kernel)"}


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _f(v: float | None, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def _carried(v: dict[str, Any]) -> bool:
    """Its rows ride in the notification (sealed, or boxed): its floor is the carried one."""
    return "sealed" in v["key"] or "boxed" in v["key"]


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1e3


def _twice(us: float | None) -> float | None:
    """Two flushes, in ms: one per direction."""
    ms = _ms(us)
    return None if ms is None else 2 * ms


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant, every rep pooled: median ping, median of every stage (ms), the floor."""
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(r["key"] for r in runs):
        mine = [r for r in runs if r["key"] == key]
        trips = [t for r in mine for t in r["trips"]]
        stages = {name: _med([t[name] * 1e3 for t in trips])
                  for name in [f"{d}.{s}" for d, _ in DIRECTIONS for s, _ in STAGES]
                  + ["kernel", "total"]}
        out[key] = {
            "key": key,
            "ping_p50": percentile([p for r in mine for p in r["ping_ms"]], 0.5),
            "ping_p99": percentile([p for r in mine for p in r["ping_ms"]], 0.99),
            "warm_p50": percentile([p for r in mine for p in r.get("ping_warm_ms", [])], 0.5),
            "warm_p99": percentile([p for r in mine for p in r.get("ping_warm_ms", [])], 0.99),
            "trips": len(trips), "stages": stages,
            "fsync_us": _med([r["fsync"]["us"] for r in mine]),
            "wal_sync_method": mine[0]["fsync"]["method"],
            "flush_warm_us": _med([r["fsync"]["warm_us"] for r in mine]),
            "flush_paused_us": _med([r["fsync"]["paused_us"] for r in mine]),
            "commit": _med([r["floor_ms"]["commit"] for r in mine]),
            "floor_logged": _med([2 * r["floor_ms"]["logged"] for r in mine]),
            "floor_carried": _med([2 * r["floor_ms"]["carried"] for r in mine]),
        }
    return out


def markdown(runs: list[dict[str, Any]]) -> str:
    s = summary(runs)
    keys = list(s)
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]

    def row(label: str, f: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(f(s[k]) for k in keys) + " |")

    row("**idle ping p50 / p99 ms**",
        lambda v: f"**{_f(v['ping_p50'])}** / {_f(v['ping_p99'])}")
    row("back-to-back ping p50 / p99 ms (`ping -A`)",
        lambda v: f"{_f(v['warm_p50'])} / {_f(v['warm_p99'])}")
    row("round trips cut into stages (idle pings)", lambda v: str(v["trips"]))
    for d, what in DIRECTIONS:
        for name, label in STAGES:
            row(f"{what}: {label}", lambda v, n=f"{d}.{name}": _f(v["stages"][n]))
        if d == "out":
            row(KERNEL, lambda v: _f(v["stages"]["kernel"]))
    row("sum of the stages (median of each trip's total)", lambda v: _f(v["stages"]["total"]))
    row("floor: a WAL flush (pg_test_fsync, one 8 kB write), ms",
        lambda v: f"{_f(v['fsync_us'] / 1e3, '{:.3f}')} ({v['wal_sync_method']})")
    row("the same flush after an idle ping's pause / back to back, ms",
        lambda v: f"{_f(_ms(v['flush_paused_us']), '{:.3f}')} / "
                  f"{_f(_ms(v['flush_warm_us']), '{:.3f}')}")
    row("idle floor: two flushes after a pause (an idle round trip commits twice), ms",
        lambda v: _f(_twice(v["flush_paused_us"])))
    row("idle ping / idle floor", lambda v: _ratio(v["ping_p50"], _twice(v["flush_paused_us"])))
    row("floor: INSERT + COMMIT round trip, ms", lambda v: _f(v["commit"], "{:.3f}"))
    row("floor: round trip the seed's way (2 x INSERT + NOTIFY, wake, SELECT by id)",
        lambda v: _f(v["floor_logged"]))
    row("floor: round trip carried (2 x INSERT + NOTIFY, wake)",
        lambda v: _f(v["floor_carried"]))
    row("back-to-back ping / floor (logged: the seed's way; sealed, boxed: carried)",
        lambda v: _ratio(v["warm_p50"], v["floor_carried" if _carried(v) else "floor_logged"]))
    row("idle ping / floor",
        lambda v: _ratio(v["ping_p50"], v["floor_carried" if _carried(v) else "floor_logged"]))
    return "\n".join(lines) + "\n"


def write(runs: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> list[Path]:
    md, js, png = report.outputs(out, "rtt")
    s = summary(runs)
    md.write_text(f"# pgvpn bench rtt, {meta['started']}\n\n{len(runs)} labs, "
                  f"{meta['pings']} pings each, load average {meta['loadavg_before']:.2f} "
                  f"before, {meta['loadavg_after']:.2f} after\n\n" + markdown(runs))
    js.write_text(json.dumps({"meta": meta, "runs": runs, "summary": s}, indent=1))
    chart(s, png)
    return [md, js, png]


def chart(s: dict[str, dict[str, Any]], path: Path) -> None:
    """One stacked bar per variant (its stages, both directions added) beside the floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * (len(s) + 3)))
    labels: list[str] = []
    drawn = False
    for i, (key, v) in enumerate(s.items()):
        labels.append(f"{key} (ping p50 {_f(v['ping_p50'])} ms)")
        if not v["trips"]:  # the seed's program: its ping alone
            ax.barh(i, v["ping_p50"] or 0, color="0.75", hatch="//",
                    label="ping, not cut into stages")
            continue
        left = 0.0
        for name, _ in [*STAGES, ("kernel", KERNEL)]:
            width = sum(v["stages"].get(f"{d}.{name}") or 0 for d, _ in DIRECTIONS) \
                if name != "kernel" else (v["stages"]["kernel"] or 0)
            ax.barh(i, width, left=left, color=f"C{[n for n, _ in STAGES].index(name)}"
                    if name != "kernel" else "0.6", label=None if drawn else LEGEND[name])
            left += width
        drawn = True
    first = s.get("logged") or next(iter(s.values()))  # its floor: the agents' TCP path
    floors = (("floor: the seed's way, back to back", first["floor_logged"]),
              ("floor: carried, back to back", first["floor_carried"]),
              ("idle floor: two flushes after a pause", _twice(first["flush_paused_us"])))
    for j, (name, value) in enumerate(floors):
        ax.barh(len(s) + j, value or 0, color="0.3")
        labels.append(f"{name} ({_f(value)} ms)")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms (medians; both directions of each stage added)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
