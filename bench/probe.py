"""What a lab spends while it carries traffic, sampled from /proc and PostgreSQL's statistics.

CPU per process group: the agents, the housekeeping service and each kind of PostgreSQL process
(backends by the session they serve — a sender's `-tx`, a receiver's `-rx` — WAL writer,
checkpointer, background writer, autovacuum, walsender, and a lab's standby's processes;
processes that exit during the window are followed until they go, their last moments counted
as `exited`). What the backends wait for, from `pg_stat_activity` at every sample. Commits and
WAL flushes from `pg_stat_database` and `pg_stat_wal`; batches (one NOTIFY each), wake-ups and
cursor saves from the agents' metrics.
Memory at the end: agents' RSS and PSS, backends' PSS (shared buffers shared out fairly).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.usage import TICK, process_cpu
from pgvpn_agent.lab import Lab, LabError

PERIOD = 0.2  # seconds between samples
# pg_stat_activity lists every backend and auxiliary process; a scan of /proc for the
# postmaster's other children (short-lived ones) every few samples is enough
CHILDREN_EVERY = 5
OWN_APP = "pgvpn-bench-probe"
ACTIVITY = """
SELECT pid, application_name, backend_type, state, wait_event_type, wait_event
FROM pg_stat_activity WHERE pid <> pg_backend_pid()
"""
COUNTERS = """
SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = 'pgvpn'),
       (SELECT sum(xact_commit) FROM pg_stat_database),
       wal_records, wal_bytes, wal_write, wal_sync
FROM pg_stat_wal
"""
AUX = {"walwriter": "walwriter", "checkpointer": "checkpointer", "walsender": "walsender",
       "background writer": "bgwriter", "autovacuum launcher": "autovacuum",
       "autovacuum worker": "autovacuum"}
# agent metrics summed over every agent, deltas over the window
AGENT_COUNTERS = {
    "batches": "pgvpn_insert_batches_total",
    "rows": "pgvpn_rows_inserted_total",
    "wakeups_notify": 'pgvpn_receiver_wakeups_total{cause="notify"}',
    "wakeups_poll": 'pgvpn_receiver_wakeups_total{cause="poll"}',
    "cursor_saves_receiver": 'pgvpn_cursor_saves_total{by="receiver"}',
    "cursor_saves_sender": 'pgvpn_cursor_saves_total{by="sender"}',
    "insert_seconds": "pgvpn_insert_duration_seconds_sum",
    "fetches": "pgvpn_fetch_duration_seconds_count",
    "fetch_seconds": "pgvpn_fetch_duration_seconds_sum",
}


@dataclass
class Usage:
    seconds: float
    cpu_s: dict[str, float]  # by process group
    counters: dict[str, float]  # deltas: database and agents
    waits: dict[str, dict[str, int]]  # role -> wait (or running / idle) -> samples
    backends: dict[str, int]  # by role, at the end
    memory_mb: dict[str, float] = field(default_factory=dict)  # by group, at the end

    @property
    def agents_cpu_s(self) -> float:
        return self.cpu_s.get("agents", 0.0)

    @property
    def postgres_cpu_s(self) -> float:
        return sum(v for k, v in self.cpu_s.items() if k not in ("agents", "housekeeping"))

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    def rate(self, key: str) -> float:
        return self.counters.get(key, 0.0) / self.seconds if self.seconds else 0.0


def role_of(app: str, backend_type: str) -> str:
    if backend_type != "client backend":
        return AUX.get(backend_type, "other aux")
    if app.endswith("-tx"):
        return "backends tx"
    if app.endswith("-rx"):
        return "backends rx"
    return "backends other"


def wait_of(state: str | None, wait_type: str | None, wait: str | None) -> str:
    if wait_type is None:
        return "running" if state == "active" else "idle"
    if wait == "ClientRead":
        return "idle" if state == "idle" else "in transaction, waiting for agent"
    return f"{wait_type}:{wait}"


class Probe:
    """Sample a lab from start() to stop(); one extra backend of its own, not counted."""

    def __init__(self, lab: Lab, memory: bool = True) -> None:
        self.lab = lab
        self.memory = memory
        self.postmaster = lab.postmaster_pid()
        # a synchronous standby's processes (labstandby): the same machine's CPU, per commit
        pidfile = lab.standby_dir / "postmaster.pid"
        self.standby = int(pidfile.read_text().split()[0]) if pidfile.exists() else 0
        self.agents = {p.pid for p in lab.peers if p.pid}
        self.done = threading.Event()
        self.group: dict[int, str] = {}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.waits: dict[str, Counter[str]] = defaultdict(Counter)
        self.backends: Counter[str] = Counter()
        self.n = 0
        # from another database, so that its own queries are not among the lab's commits
        self.conn = psycopg.connect(lab.dsn().replace("dbname=pgvpn", "dbname=postgres"),
                                    autocommit=True, application_name=OWN_APP)
        self.own = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.reaped0 = self._reaped()
        self.db0 = self._db_counters()
        self.agents0 = self._agent_counters()
        self._sample(first=True)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def stop(self) -> Usage:
        self.done.set()
        self.thread.join()
        self._sample()
        seconds = time.monotonic() - self.t0
        cpu: defaultdict[str, float] = defaultdict(float)
        gone = 0.0
        for pid, group in self.group.items():
            cpu[group] += self.last[pid] - self.first[pid]
            if not Path(f"/proc/{pid}").exists() and pid not in self.agents:
                gone += self.last[pid]
        reaped = self._reaped() - self.reaped0 - gone
        if reaped > 0:
            cpu["exited"] += reaped
        counters = {k: v - self.db0.get(k, 0.0) for k, v in self._db_counters().items()}
        agents1 = self._agent_counters()
        counters.update({k: agents1[k] - self.agents0.get(k, 0.0) for k in agents1})
        memory = self._memory() if self.memory else {}
        self.conn.close()
        return Usage(seconds=seconds, cpu_s=dict(cpu), counters=counters,
                     waits={r: dict(c) for r, c in self.waits.items()},
                     backends=dict(self.backends), memory_mb=memory)

    def _loop(self) -> None:
        while not self.done.wait(PERIOD):
            self._sample()

    def _sample(self, first: bool = False) -> None:
        backends: Counter[str] = Counter()
        for pid, app, btype, state, wtype, wait in self.conn.execute(ACTIVITY):
            role = role_of(app or "", btype or "")
            self.group[pid] = role
            backends[role] += 1
            if btype == "client backend" and not first:
                self.waits[role][wait_of(state, wtype, wait)] += 1
        self.backends = backends
        self.group.setdefault(self.postmaster, "postmaster")
        for pid in self.agents:
            self.group.setdefault(pid, "agents")
        if self.lab.housekeeping_pid:
            self.group.setdefault(self.lab.housekeeping_pid, "housekeeping")
        self.n += 1
        for pid in _children(self.postmaster) if self.n % CHILDREN_EVERY == 1 else ():
            if pid not in self.group:
                self.group[pid] = "autovacuum" if "autovacuum" in _cmdline(pid) else "other aux"
        if self.standby and self.n % CHILDREN_EVERY == 1:
            for pid in (self.standby, *_children(self.standby)):
                self.group.setdefault(pid, "standby")
        self.group.pop(self.own, None)
        for pid in list(self.group):
            try:
                cpu = process_cpu(pid)
            except (OSError, IndexError):
                if pid not in self.last:
                    del self.group[pid]
                continue
            self.first.setdefault(pid, cpu if first else 0.0)
            self.last[pid] = cpu

    def _reaped(self) -> float:
        """CPU of the postmaster's children that exited (its cutime + cstime)."""
        fields = Path(f"/proc/{self.postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / TICK

    def _db_counters(self) -> dict[str, float]:
        row = self.conn.execute(COUNTERS).fetchone()
        assert row is not None
        keys = ("commits", "commits_cluster", "wal_records", "wal_bytes", "wal_writes",
                "wal_syncs")
        return {k: float(v) for k, v in zip(keys, row, strict=True)}

    def _agent_counters(self) -> dict[str, float]:
        totals: defaultdict[str, float] = defaultdict(float)
        for peer in self.lab.peers:
            try:
                samples = self.lab.agent_metrics(peer)
            except LabError:
                continue
            for key, name in AGENT_COUNTERS.items():
                totals[key] += samples.get(name, 0.0)
        return dict(totals)

    def _memory(self) -> dict[str, float]:
        """MB by group at the end: agents' RSS and PSS, every PostgreSQL process's PSS."""
        memory: defaultdict[str, float] = defaultdict(float)
        for pid, group in self.group.items():
            rollup = _smaps_rollup(pid)
            if not rollup:
                continue
            if group == "agents":
                memory["agents RSS"] += rollup.get("Rss", 0) / 1024
                memory["agents PSS"] += rollup.get("Pss", 0) / 1024
            elif group != "housekeeping":
                memory[f"{group} PSS"] += rollup.get("Pss", 0) / 1024
        return dict(memory)


def _children(ppid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _smaps_rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/<pid>/smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    out: dict[str, Any] = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out
