"""The database's own limits under a steady tunnel: transaction ids, WAL, hot-row bloat.

A `pgvpn lab` carries a steady UDP stream (iperf3 -u at --rate, datagrams of --length bytes:
one row each, the sender's batches as small as the rate makes them) for --minutes while the
database is sampled every --interval seconds: transaction ids consumed and the database's
age(datfrozenxid), WAL written and the size of pg_wal, dead rows and size of the rows every
batch updates (link, cursor, usage) and autovacuum's runs on them, and the sending agent's
time per batch. Three things happen on the way:

- a closed day: yesterday's partition, filled and vacuumed as its own day's autovacuums would
  have left it, then indexed as housekeeping does; housekeeping's freeze job has autovacuum
  freeze it, and its relfrozenxid age shows when;
- a peer's login holds a transaction open (at 40 %): housekeeping's watchdog ends it after
  --max-transaction seconds, the bound on what a peer can hold back;
- a superuser holds a snapshot as pg_dump does (at 50 %, for --hold minutes): nothing ends it,
  and the hot rows bloat until it is released.

Per day extrapolations: transaction ids, days until autovacuum_freeze_max_age (anti-wraparound
vacuums) and until the 2^31 limit if nothing were ever frozen, WAL.

    .venv/bin/pgvpn bench soak --minutes 60 --rate 4M --length 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench import report
from bench.testbeds import scratch_dir
from pgvpn_agent.lab import HOUSEKEEPING_ROLE, Lab, LabError, LabPeer

RESULTS = Path(__file__).with_name("results")
HOT_TABLES = ("link", "cursor", "usage")
# PostgreSQL refuses to assign transaction ids 3M short of 2^31 (xidStopLimit).
XID_STOP = 2**31 - 3_000_000

DATABASE = """
SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
       age(d.datfrozenxid), current_setting('autovacuum_freeze_max_age')::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
       (SELECT coalesce(sum(w.size), 0) FROM pg_ls_waldir() w)::bigint,
       (SELECT coalesce(max(greatest(age(a.backend_xmin), age(a.backend_xid))), 0)
        FROM pg_stat_activity a WHERE a.datname = current_database()),
       (SELECT count(*) FROM pg_stat_activity a
        WHERE a.query LIKE 'autovacuum:%to prevent wraparound%'),
       (SELECT b.checkpoints_timed + b.checkpoints_req FROM pg_stat_bgwriter b),
       current_setting('data_directory')
FROM pg_database d WHERE d.datname = current_database()
"""
# rows: exact (the statistics' estimate of a two-row table is anything)
HOT = """
SELECT s.relname, CASE s.relname WHEN 'link' THEN (SELECT count(*) FROM pgvpn.link)
                                 WHEN 'cursor' THEN (SELECT count(*) FROM pgvpn.cursor)
                                 ELSE (SELECT count(*) FROM pgvpn.usage) END,
       s.n_dead_tup, s.n_tup_upd, s.n_tup_hot_upd,
       s.autovacuum_count, pg_relation_size(s.relid), pg_total_relation_size(s.relid)
FROM pg_stat_user_tables s WHERE s.schemaname = 'pgvpn' AND s.relname = ANY (%s)
"""
SETTINGS = """
SELECT name, current_setting(name) FROM pg_settings WHERE name IN (
    'max_wal_size', 'wal_keep_size', 'max_slot_wal_keep_size', 'checkpoint_timeout',
    'autovacuum_naptime', 'autovacuum_freeze_max_age', 'autovacuum_vacuum_cost_limit',
    'shared_buffers', 'synchronous_commit')
"""
PARTITIONS = """
SELECT c.relname, greatest(age(c.relfrozenxid), age(t.relfrozenxid)),
       pg_total_relation_size(c.oid), coalesce(s.autovacuum_count, 0),
       coalesce(array_to_string(c.reloptions, ','), '')
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE i.inhparent = 'pgvpn.packet'::regclass AND c.relname ~ '^packet_[0-9]{8}$'
"""


@dataclass
class Sample:
    t: float  # seconds since the stream started
    phase: str
    xid: int  # next transaction id (64-bit)
    xid_age: int  # age(datfrozenxid)
    freeze_max_age: int  # autovacuum_freeze_max_age
    wal_bytes: int  # WAL position
    wal_dir_bytes: int  # size of pg_wal
    wal_fs_avail_bytes: int
    horizon_age: int  # oldest snapshot of a session of the database, in transactions
    wraparound_vacuums: int  # anti-wraparound autovacuums running
    checkpoints: int
    hot: dict[str, dict[str, int]]  # table -> live, dead, updates, hot_updates, autovacuums, ...
    partitions: dict[str, dict[str, Any]]  # partition -> xid_age, bytes, autovacuums, options
    # the sending agent's batches so far and the time spent in them (send_batch() and commit)
    batches: float = 0.0
    batch_seconds: float = 0.0


@dataclass
class Soak:
    minutes: float
    rate: str
    length: int
    hold_minutes: float
    max_transaction: float
    closed_day_rows: int = 200_000
    started: str = ""
    load_before: float = 0.0
    load_after: float = 0.0
    closed_day: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    agents: dict[str, dict[str, float]] = field(default_factory=dict)
    iperf: dict[str, Any] = field(default_factory=dict)


def sample(conn: psycopg.Connection[Any], t: float, phase: str) -> Sample:
    row = conn.execute(DATABASE).fetchone()
    assert row is not None
    xid, age, freeze_max_age, wal, wal_dir, horizon, wraparound, checkpoints, datadir = row
    fs = os.statvfs(Path(datadir) / "pg_wal")
    hot = {str(name): {"live": live, "dead": dead, "updates": upd, "hot_updates": hot_upd,
                       "autovacuums": av, "heap_bytes": heap, "total_bytes": total}
           for name, live, dead, upd, hot_upd, av, heap, total
           in conn.execute(HOT, (list(HOT_TABLES),))}
    parts = {str(name): {"xid_age": p_age, "bytes": size, "autovacuums": av, "options": opts}
             for name, p_age, size, av, opts in conn.execute(PARTITIONS)}
    return Sample(t=round(t, 1), phase=phase, xid=xid, xid_age=age,
                  freeze_max_age=freeze_max_age, wal_bytes=wal,
                  wal_dir_bytes=wal_dir, wal_fs_avail_bytes=fs.f_bavail * fs.f_frsize,
                  horizon_age=horizon, wraparound_vacuums=wraparound, checkpoints=checkpoints,
                  hot=hot, partitions=parts)


def closed_day(lab: Lab, rows: int) -> str:
    """Yesterday's partition as its day would have left it: filled, then vacuumed by the day's
    own autovacuums (pages all-visible, rows not frozen), then indexed by housekeeping."""
    day = (datetime.now(UTC) - timedelta(days=1)).date()
    name = f"packet_{day:%Y%m%d}"
    lab.psql(f"SET ROLE pgvpn_owner; CREATE TABLE IF NOT EXISTS pgvpn.{name} PARTITION OF "
             f"pgvpn.packet FOR VALUES FROM ('{day} 00:00+00') TO ('{day + timedelta(days=1)} "
             "00:00+00')")
    lab.psql(f"INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, logged_at, ip_version, "
             f"src_addr, dst_addr, protocol, src_port, dst_port, length, payload) "
             f"SELECT 1, 2, -g, '{day} 12:00+00', '{day} 12:00+00', 4, '10.77.0.1', "
             f"'10.77.0.2', 17, 40000, 5201, 540, decode(repeat('ab', 540), 'hex') "
             f"FROM generate_series(1, {rows}) g")
    lab.psql(f"VACUUM pgvpn.{name}")
    lab.psql("SELECT pgvpn.index_closed_days()", user=HOUSEKEEPING_ROLE)
    return name


class Holder:
    """A session that holds a snapshot open (REPEATABLE READ, as pg_dump does)."""

    def __init__(self, dsn: str, name: str) -> None:
        self.ended = False
        self.conn = psycopg.connect(dsn, application_name=f"pgvpn-soak-{name}")
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        self.conn.execute("SELECT count(*) FROM pgvpn.link").fetchone()

    def alive(self) -> bool:
        try:
            self.conn.execute("SELECT 1").fetchone()
            return True
        except psycopg.Error:
            return False

    def close(self) -> None:
        self.conn.close()


def start_stream(lab: Lab, src: LabPeer, dst: LabPeer, rate: str, length: int,
                 seconds: float) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    server = subprocess.Popen(["ip", "netns", "exec", dst.netns, "iperf3", "-s", "-1", "-B",
                               dst.ipv4], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              text=True)
    for _ in range(50):
        if lab.exec(dst, ["ss", "-ltn", f"src {dst.ipv4}:5201"]).stdout.count("LISTEN"):
            break
        time.sleep(0.1)
    client = subprocess.Popen(["ip", "netns", "exec", src.netns, "iperf3", "-J", "-u", "-c",
                               dst.ipv4, "-b", rate, "-l", str(length), "-t", str(int(seconds))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return server, client


def run(soak: Soak, workdir: Path, interval: float) -> None:
    pid = os.getpid()
    lab = Lab.create(workdir, prefix=f"pgvs{pid}-", port=57000 + pid % 1000)
    lab.housekeeping = {"max_transaction": soak.max_transaction}
    try:
        lab.up()
        soak.closed_day = closed_day(lab, soak.closed_day_rows)
        soak.started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        soak.load_before = os.getloadavg()[1]
        a, b = lab.peers
        before = {p.name: lab.agent_metrics(p) for p in lab.peers}
        seconds = soak.minutes * 60
        server, client = start_stream(lab, a, b, soak.rate, soak.length, seconds)
        try:
            _observe(soak, lab, seconds, interval)
            out, err = client.communicate(timeout=120)
            report = json.loads(out or "{}")
            soak.iperf = report.get("end", {}).get("sum", {}) or {"error": err.strip()}
        finally:
            for proc in (client, server):
                proc.kill()
                proc.wait()
        after = {p.name: lab.agent_metrics(p) for p in lab.peers}
        soak.agents = {name: {k: after[name][k] - before[name].get(k, 0.0)
                              for k in after[name] if _counted(k)} for name in after}
        soak.load_after = os.getloadavg()[1]
    finally:
        lab.down()


def _counted(key: str) -> bool:
    return key.startswith(("pgvpn_insert_batches_total", "pgvpn_rows_inserted_total",
                           "pgvpn_cursor_saves_total", "pgvpn_packets_total"))


def _observe(soak: Soak, lab: Lab, seconds: float, interval: float) -> None:
    """Sample until the stream ends, opening and closing the holders on schedule."""
    peer_at, hold_at = 0.4 * seconds, 0.5 * seconds
    release_at = hold_at + soak.hold_minutes * 60
    peer: Holder | None = None
    dump: Holder | None = None
    started = time.monotonic()
    with psycopg.connect(lab.dsn(), autocommit=True, application_name="pgvpn-soak") as conn:
        soak.settings = {str(k): str(v) for k, v in conn.execute(SETTINGS)}
        while (t := time.monotonic() - started) < seconds:
            if peer is None and t >= peer_at:
                peer = Holder(lab.dsn(f"pgvpn_{lab.peers[1].name}"), "peer")
                soak.events.append({"t": round(t, 1), "event": "peer opens a transaction"})
            if peer is not None and not peer.ended and not peer.alive():
                soak.events.append({"t": round(t, 1), "event": "watchdog ended it"})
                peer.ended = True
            if dump is None and hold_at <= t < release_at:
                dump = Holder(lab.dsn(), "dump")
                soak.events.append({"t": round(t, 1), "event": "snapshot held (pg_dump)"})
            if dump is not None and t >= release_at:
                dump.close()
                dump = None
                soak.events.append({"t": round(t, 1), "event": "snapshot released"})
            phase = ("hold" if dump is not None else "release" if t >= release_at
                     else "steady" if peer is None else "between" if peer.ended else "peer")
            soak.samples.append(sample(conn, t, phase))
            _batches(soak.samples[-1], lab)
            _status(soak, t, seconds)
            time.sleep(max(0.0, interval - (time.monotonic() - started - t)))
        soak.samples.append(sample(conn, time.monotonic() - started, "release"))
        _batches(soak.samples[-1], lab)
    for holder in (peer, dump):
        if holder is not None:
            holder.close()


def _batches(s: Sample, lab: Lab) -> None:
    m = lab.agent_metrics(lab.peers[0])
    s.batches = m.get("pgvpn_insert_duration_seconds_count", 0.0)
    s.batch_seconds = m.get("pgvpn_insert_duration_seconds_sum", 0.0)


def batch_ms(samples: list[Sample]) -> float | None:
    """Mean wall time of the sender's batch transactions over these samples."""
    if len(samples) < 2 or samples[-1].batches <= samples[0].batches:
        return None
    return ((samples[-1].batch_seconds - samples[0].batch_seconds)
            / (samples[-1].batches - samples[0].batches) * 1000)


def _status(soak: Soak, t: float, seconds: float) -> None:
    s = soak.samples[-1]
    print(f"\r\x1b[K[{t / 60:.0f}/{seconds / 60:.0f} min] {s.phase}: xid {s.xid}, "
          f"WAL {s.wal_bytes / 1e9:.2f} GB, pg_wal {s.wal_dir_bytes / 1e6:.0f} MB, dead "
          + ", ".join(f"{k} {v['dead']}" for k, v in sorted(s.hot.items())),
          end="" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)


# -- the report ----------------------------------------------------------------------------------

def rates(soak: Soak) -> dict[str, Any]:
    """Per second over the steady part (before the holders), and the per-day extrapolations."""
    steady = phase(soak, "steady") or soak.samples
    first, last = steady[0], steady[-1]
    span = max(last.t - first.t, 1.0)
    xids = (last.xid - first.xid) / span
    wal = (last.wal_bytes - first.wal_bytes) / span
    end = soak.samples[-1]
    batches = sum(v for m in soak.agents.values() for k, v in m.items()
                  if k.startswith("pgvpn_insert_batches_total"))
    receiver_saves = sum(v for m in soak.agents.values() for k, v in m.items()
                         if k == 'pgvpn_cursor_saves_total{by="receiver"}')
    whole = max(end.t - soak.samples[0].t, 1.0)
    freeze_max = soak.samples[0].freeze_max_age
    return {
        "xids_per_s": xids, "xids_per_day": xids * 86400,
        "batches_per_s": batches / whole, "receiver_commits_per_s": receiver_saves / whole,
        "xids_per_batch": (end.xid - soak.samples[0].xid) / batches if batches else None,
        "days_to_freeze_max_age": freeze_max / xids / 86400 if xids else None,
        "days_to_xid_stop": (XID_STOP - end.xid_age) / xids / 86400 if xids else None,
        "wal_bytes_per_s": wal, "wal_bytes_per_day": wal * 86400,
        "wal_dir_max_bytes": max(s.wal_dir_bytes for s in soak.samples),
        "wal_dir_min_bytes": min(s.wal_dir_bytes for s in soak.samples),
        "checkpoints": end.checkpoints - soak.samples[0].checkpoints,
        "wraparound_vacuums_seen": sum(1 for s in soak.samples if s.wraparound_vacuums),
    }


def phase(soak: Soak, name: str) -> list[Sample]:
    return [s for s in soak.samples if s.phase == name]


def _hot_share(samples: list[Sample], table: str) -> float | None:
    """Share of the phase's updates that were HOT (no new index entry)."""
    if len(samples) < 2:
        return None
    first, last = samples[0].hot[table], samples[-1].hot[table]
    updates = last["updates"] - first["updates"]
    return (last["hot_updates"] - first["hot_updates"]) / updates if updates else None


def hot_rows(soak: Soak) -> dict[str, dict[str, Any]]:
    """Per table, per phase: dead rows and size (indexes included) in steady state, while the
    peer's transaction was open (until the watchdog ended it), at the end of the held snapshot
    and at the end; growth per minute of hold; HOT share; autovacuum runs."""
    out: dict[str, dict[str, Any]] = {}
    steady, peer, hold = phase(soak, "steady"), phase(soak, "peer"), phase(soak, "hold")
    first, end = soak.samples[0], soak.samples[-1]
    for table in HOT_TABLES:
        if table not in end.hot:
            continue
        before = steady[-1].hot[table] if steady else first.hot[table]
        index = soak.samples.index(hold[0]) if hold else len(soak.samples)
        before_hold = soak.samples[max(0, index - 1)].hot[table]
        held = hold[-1].hot[table] if hold else before_hold
        minutes = (hold[-1].t - soak.samples[max(0, index - 1)].t) / 60 if hold else 0.0
        updates = end.hot[table]["updates"] - first.hot[table]["updates"]
        out[table] = {
            "live": end.hot[table]["live"],
            "updates_per_s": updates / max(end.t - first.t, 1.0),
            "autovacuums": end.hot[table]["autovacuums"] - first.hot[table]["autovacuums"],
            "steady_dead_max": max((s.hot[table]["dead"] for s in steady), default=0),
            "steady_bytes": before["total_bytes"], "steady_hot_share": _hot_share(steady, table),
            "peer_dead_max": max((s.hot[table]["dead"] for s in peer), default=0),
            "peer_bytes_added": max((s.hot[table]["total_bytes"]
                                     for s in peer + phase(soak, "between")),
                                    default=before["total_bytes"]) - before["total_bytes"],
            "hold_dead": held["dead"], "hold_bytes": held["total_bytes"],
            "hold_dead_per_min": (held["dead"] - before_hold["dead"]) / minutes
                                 if minutes else None,
            "hold_bytes_per_min": (held["total_bytes"] - before_hold["total_bytes"]) / minutes
                                  if minutes else None,
            "hold_hot_share": _hot_share(hold, table),
            "end_dead": end.hot[table]["dead"], "end_bytes": end.hot[table]["total_bytes"],
        }
    return out


def peer_held(soak: Soak) -> float | None:
    """Seconds the peer's transaction stayed open before the watchdog ended it."""
    at = {e["event"]: e["t"] for e in soak.events}
    if "watchdog ended it" not in at:
        return None
    return float(at["watchdog ended it"] - at["peer opens a transaction"])


def freeze(soak: Soak) -> dict[str, Any]:
    """The closed day: its age when the stream started, when it was marked, when frozen."""
    name = soak.closed_day
    seen = [(s.t, s.partitions[name]) for s in soak.samples if name in s.partitions]
    if not seen:
        return {}
    marked = next((t for t, p in seen if "autovacuum_freeze_max_age" in p["options"]), None)
    ages = [p["xid_age"] for _, p in seen]
    frozen = next((t for (t, p), prev in zip(seen[1:], ages, strict=False)
                   if p["xid_age"] < prev // 2), None)
    return {"partition": name, "bytes": seen[0][1]["bytes"], "age_at_start": ages[0],
            "age_before_freeze": max(ages[: next((i for i, (t, _) in enumerate(seen)
                                                   if t == frozen), len(ages))] or [0]),
            "marked_at_s": marked, "frozen_at_s": frozen, "age_at_end": ages[-1],
            "autovacuums": seen[-1][1]["autovacuums"] - seen[0][1]["autovacuums"],
            "done": "autovacuum_freeze_min_age=0" in seen[-1][1]["options"]
                    and "autovacuum_freeze_max_age" not in seen[-1][1]["options"]}


def table(soak: Soak) -> str:
    r, h, f = rates(soak), hot_rows(soak), freeze(soak)
    end = soak.samples[-1]
    lines = [
        f"Soak: {soak.minutes:.0f} min of iperf3 -u -b {soak.rate} -l {soak.length} peer1 -> "
        f"peer2, started {soak.started}; load average {soak.load_before:.1f} before, "
        f"{soak.load_after:.1f} after (2 shared cores).",
        "",
        "| what | measured | per day |",
        "|---|---|---|",
        f"| sender batches | {r['batches_per_s']:.0f}/s | "
        f"{r['batches_per_s'] * 86400 / 1e6:.1f}M |",
        f"| receiver cursor commits | {r['receiver_commits_per_s']:.0f}/s | "
        f"{r['receiver_commits_per_s'] * 86400 / 1e6:.1f}M |",
        f"| transaction ids | {r['xids_per_s']:.0f}/s "
        f"({_f(r['xids_per_batch'], '{:.2f}')} per batch) | {r['xids_per_day'] / 1e6:.0f}M |",
        f"| until autovacuum_freeze_max_age ({end.freeze_max_age / 1e6:.0f}M): "
        "anti-wraparound vacuums | | "
        f"{_f(r['days_to_freeze_max_age'], '{:.1f}')} days |",
        f"| until the 2^31 stop, were nothing ever frozen | | "
        f"{_f(r['days_to_xid_stop'], '{:.1f}')} days |",
        f"| database age(datfrozenxid) at the end | {end.xid_age / 1e6:.2f}M | |",
        f"| WAL written | {r['wal_bytes_per_s'] / 1e6:.2f} MB/s | "
        f"{r['wal_bytes_per_day'] / 1e9:.0f} GB |",
        f"| pg_wal size (min / max), max_wal_size {soak.settings.get('max_wal_size')} | "
        f"{r['wal_dir_min_bytes'] / 1e6:.0f} / "
        f"{r['wal_dir_max_bytes'] / 1e6:.0f} MB ({r['checkpoints']} checkpoints) | |",
    ]
    held = peer_held(soak)
    for name, t in h.items():
        lines.append(
            f"| `{name}` ({t['live']} rows): {t['updates_per_s']:.0f} updates/s, "
            f"{t['autovacuums']} autovacuums | "
            f"steady: ≤ {t['steady_dead_max']} dead, {t['steady_bytes'] / 1e3:.0f} kB, "
            f"{_f(t['steady_hot_share'], '{:.1%}')} HOT; a peer's transaction, ended by the "
            f"watchdog after {_f(held, '{:.0f}')} s: ≤ {t['peer_dead_max']} dead, "
            f"{t['peer_bytes_added'] / 1e3:+.0f} kB at most; snapshot held "
            f"{soak.hold_minutes:g} min: "
            f"{t['hold_dead']} dead, {t['hold_bytes'] / 1e3:.0f} kB "
            f"({_f(t['hold_bytes_per_min'], '{:+.0f}', 1e-3)} kB/min), "
            f"{_f(t['hold_hot_share'], '{:.1%}')} HOT; after release: {t['end_dead']} dead, "
            f"{t['end_bytes'] / 1e3:.0f} kB | |")
    if f:
        lines.append(
            f"| closed day `{f['partition']}` ({f['bytes'] / 1e6:.0f} MB): relfrozenxid age | "
            f"{f['age_before_freeze']} before freezing, {f['age_at_end']} at the end "
            f"(marked at {_f(f['marked_at_s'], '{:.0f}')} s, frozen by "
            f"{_f(f['frozen_at_s'], '{:.0f}')} s, {f['autovacuums']} autovacuums) | |")
    hold = phase(soak, "hold")
    late = batch_ms([s for s in hold if s.t >= hold[-1].t - 300]) if hold else None
    if batch_ms(phase(soak, "steady")) is not None:  # runs before it was sampled have none
        lines.append(f"| sender's batch (send_batch() and commit), mean | steady "
                     f"{_f(batch_ms(phase(soak, 'steady')), '{:.2f}')} ms; last 5 min of the "
                     f"held snapshot {_f(late, '{:.2f}')} ms; after release "
                     f"{_f(batch_ms(phase(soak, 'release')), '{:.2f}')} ms | |")
    lines.append("")
    lines += [f"- {e['t'] / 60:.1f} min: {e['event']}" for e in soak.events]
    return "\n".join(lines)


def chart(soak: Soak, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in soak.samples]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    (xid, wal), (dead, size) = axes
    xid.plot(t, [(s.xid - soak.samples[0].xid) / 1e6 for s in soak.samples],
             label="transaction ids consumed")
    xid.plot(t, [s.xid_age / 1e6 for s in soak.samples], label="age(datfrozenxid)")
    name = soak.closed_day
    xid.plot(t, [s.partitions.get(name, {}).get("xid_age", 0) / 1e6 for s in soak.samples],
             label=f"closed day {name}: relfrozenxid age")
    xid.set_ylabel("millions of transactions")
    wal.plot(t, [(s.wal_bytes - soak.samples[0].wal_bytes) / 1e9 for s in soak.samples],
             label="WAL written (GB)")
    wal.plot(t, [s.wal_dir_bytes / 1e9 for s in soak.samples], label="pg_wal size (GB)")
    wal.set_ylabel("GB")
    for table in HOT_TABLES:
        dead.plot(t, [s.hot.get(table, {}).get("dead", 0) for s in soak.samples], label=table)
        size.plot(t, [s.hot.get(table, {}).get("total_bytes", 0) / 1e6 for s in soak.samples],
                  label=table)
    dead.set_ylabel("dead rows")
    size.set_ylabel("size with indexes (MB)")
    for ax in (dead, size):
        ax.set_xlabel("minutes")
    peer = [s.t / 60 for s in phase(soak, "peer")]
    hold = [s.t / 60 for s in phase(soak, "hold")]
    for ax in (xid, wal, dead, size):
        if peer:
            ax.axvspan(min(peer), max(peer), color="tab:orange", alpha=0.15,
                       label="peer's transaction (watchdog)")
        if hold:
            ax.axvspan(min(hold), max(hold), color="tab:red", alpha=0.1, label="snapshot held")
        ax.legend(fontsize=8)
    fig.suptitle(f"pgvpn bench soak: iperf3 -u -b {soak.rate} -l {soak.length}, "
                 f"{soak.minutes:.0f} min ({soak.started})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(soak: Soak, out: Path) -> list[Path]:
    md, js, png = report.outputs(out, "soak")
    md.write_text(table(soak) + "\n")
    data = asdict(soak) | {"rates": rates(soak), "hot_rows": hot_rows(soak),
                           "peer_held_s": peer_held(soak), "freeze": freeze(soak)}
    js.write_text(json.dumps(data) + "\n")
    chart(soak, png)
    return [md, js, png]


def load(path: Path) -> Soak:
    """An earlier run, from its JSON, to render again."""
    data = json.loads(path.read_text())
    fields = {f for f in Soak.__dataclass_fields__}
    soak = Soak(**{k: v for k, v in data.items() if k in fields})
    soak.samples = [Sample(**s) for s in data["samples"]]
    return soak


def _f(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else spec.format(value * scale)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pgvpn bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0, help="length of the stream")
    p.add_argument("--rate", default="4M", help="iperf3 -b: bits per second (default 4M)")
    p.add_argument("--length", type=int, default=512, help="UDP datagram bytes (default 512)")
    p.add_argument("--hold", type=float, help="minutes the pg_dump-like snapshot is held, from "
                   "half-way (default: a quarter of --minutes)")
    p.add_argument("--max-transaction", type=float, default=60.0,
                   help="housekeeping's watchdog (default 60 s)")
    p.add_argument("--closed-day-rows", type=int, default=200_000,
                   help="rows of the closed day (540-byte payloads; default 200000, ~160 MB)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output dir (default {RESULTS})")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="render the table and chart of an earlier run again, run nothing")
    args = p.parse_args(argv)
    if args.report:
        soak = load(args.report)
        print(table(soak))
        for path in write(soak, args.out):
            print(path, file=sys.stderr)
        return 0
    hold = args.minutes / 4 if args.hold is None else args.hold
    soak = Soak(minutes=args.minutes, rate=args.rate, length=args.length, hold_minutes=hold,
                max_transaction=args.max_transaction, closed_day_rows=args.closed_day_rows)
    workdir = scratch_dir("soak")
    try:
        run(soak, workdir, args.interval)
    except LabError as exc:
        print(f"pgvpn bench soak: error: {exc}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(table(soak))
    for path in write(soak, args.out):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
