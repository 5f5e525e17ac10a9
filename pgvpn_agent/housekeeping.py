"""`pgvpn db housekeeping`: the database work no packet waits for, on the database host.

Partitions ahead of time, indexes on closed days, closed days frozen, retention, room on a
filling disk, a watchdog over peer sessions, and the database's own limits measured (transaction
ids, WAL, vacuum held back, the rows every batch updates). It runs as its own login
(pgvpn_housekeeping, a member of pgvpn_operator), not in the agents: a peer's credentials reach
no operator function (schema v11, docs/security.md). Jobs run on a small connection pool and
thread pool, so a slow DROP or a reconnect costs one period of that job, never another job's.
With several database hosts each runs one, and only the primary's works (noderole.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from pgvpn_agent import db, metrics, wire
from pgvpn_agent.config import Database, Retention
from pgvpn_agent.noderole import NodeRole

log = logging.getLogger(__name__)

Job = Callable[[db.Conn], None]
# Reads only: a standby's WAL, transaction ids and horizon (hot_standby_feedback) matter too.
ON_STANDBYS = frozenset({"limits"})


@dataclass
class Periodic:
    name: str
    every: float
    run: Job
    due: float = 0.0
    running: Future[None] | None = None


def ensure_partitions(conn: db.Conn) -> None:
    row = conn.execute("SELECT pgvpn.ensure_partitions()").fetchone()
    if row and row[0]:
        log.info("created %d packet partitions ahead of time", row[0])


def index_closed_days(conn: db.Conn) -> None:
    row = conn.execute("SELECT pgvpn.index_closed_days()").fetchone()
    if row and row[0]:
        log.info("created %d address and port indexes on closed days of the log", row[0])


def freeze_closed_days(conn: db.Conn) -> None:
    """Have autovacuum freeze each closed day once, one day at a time (migration 0012)."""
    rows = conn.execute("SELECT partition, state, bytes, xid_age "
                        "FROM pgvpn.freeze_closed_days()").fetchall()
    for part, state, size, age in rows:
        if state == "marked":
            log.info("freeze: %s (%.1f MB, %d transactions old) is closed: autovacuum freezes "
                     "it within 100k transactions", part, size / 1e6, age)
        elif state == "frozen":
            log.info("freeze: %s is frozen; no vacuum rewrites it again", part)
    unfrozen = [age for _, state, _, age in rows if state not in ("frozen", "done")]
    metrics.LOG_UNFROZEN_DAYS.set(len(unfrozen))
    metrics.LOG_UNFROZEN_AGE.set(max(unfrozen, default=0))


# Transaction ids, the horizon vacuum is held back to, WAL and the rows every batch updates.
# Sessions of this database hold back its tables' horizon (and walsenders: standbys' feedback),
# replication slots and prepared transactions every database's.
_LIMITS = """
SELECT age(d.datfrozenxid), current_setting('autovacuum_freeze_max_age')::float8,
       pg_snapshot_xmax(pg_current_snapshot())::text::float8,
       coalesce(greatest(
           (SELECT max(greatest(age(a.backend_xmin), age(a.backend_xid))) FROM pg_stat_activity a
            WHERE a.datname = current_database() OR a.backend_type = 'walsender'),
           (SELECT max(greatest(age(s.xmin), age(s.catalog_xmin))) FROM pg_replication_slots s),
           (SELECT max(age(x.transaction)) FROM pg_prepared_xacts x)), 0),
       coalesce((SELECT extract(epoch FROM now() - min(a.xact_start))::float8
                 FROM pg_stat_activity a
                 WHERE a.datname = current_database() AND a.backend_type = 'client backend'
                   AND a.pid <> pg_backend_pid()), 0),
       pg_size_bytes(current_setting('max_wal_size'))::float8,
       pg_size_bytes(current_setting('wal_keep_size'))::float8,
       pg_size_bytes(current_setting('max_slot_wal_keep_size'))::float8,
       (SELECT count(*) FROM pg_ls_archive_statusdir() f WHERE f.name LIKE '%.ready')::float8,
       current_setting('data_directory')
FROM pg_database d WHERE d.datname = current_database()
"""
HOT_TABLES = ("link", "cursor", "usage")
_HOT_ROWS = """
SELECT s.relname, s.n_dead_tup::float8, pg_total_relation_size(s.relid)::float8
FROM pg_stat_user_tables s WHERE s.schemaname = 'pgvpn' AND s.relname = ANY (%s)
"""


class Limits:
    """The database's own limits under the tunnel's write rate, as metrics (docs/monitoring.md).

    One transaction id per batch ages the database towards wraparound; WAL that cannot be
    recycled (a slot, a failing archiver) fills pg_wal, and PostgreSQL stops with a PANIC when
    it is full; a transaction open for hours (a pg_dump) holds back vacuum of the link, cursor
    and usage rows that every batch updates. Runs next to PostgreSQL: it reads the filesystem
    of pg_wal itself.
    """

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, conn: db.Conn) -> None:
        row = conn.execute(_LIMITS).fetchone()
        assert row is not None
        (xid_age, freeze_max_age, xids, horizon, oldest, max_wal, keep, slot_keep, pending,
         datadir) = row
        metrics.DATABASE_XID_AGE.set(xid_age)
        metrics.DATABASE_FREEZE_MAX_AGE.set(freeze_max_age)
        metrics.DATABASE_TRANSACTION_IDS.set(xids)
        metrics.XMIN_HORIZON_AGE.set(horizon)
        metrics.OLDEST_TRANSACTION.set(oldest)
        metrics.WAL_SIZE_LIMIT.set(max_wal + max(keep, slot_keep) if slot_keep >= 0
                                   else float("inf"))
        metrics.WAL_ARCHIVE_PENDING.set(pending)
        for table, dead, size in conn.execute(_HOT_ROWS, (list(HOT_TABLES),)):
            metrics.HOT_TABLE_DEAD_ROWS.labels(table).set(dead)
            metrics.HOT_TABLE_SIZE.labels(table).set(size)
        fs = self._wal_filesystem(Path(datadir))
        metrics.WAL_FILESYSTEM_AVAIL.set(fs.f_bavail * fs.f_frsize)
        metrics.WAL_FILESYSTEM_SIZE.set(fs.f_blocks * fs.f_frsize)

    def _wal_filesystem(self, datadir: Path) -> os.statvfs_result:
        """pg_wal's filesystem (a symlink to another disk is followed); the data directory's
        when this service may not look inside it (mode 0700, another user)."""
        try:
            return os.statvfs(datadir / "pg_wal")
        except PermissionError:
            if not self.warned:
                self.warned = True
                log.info("limits: %s is not readable by this service; the WAL filesystem "
                         "metrics show the data directory's filesystem (the same, unless "
                         "pg_wal is a link to another disk)", datadir)
            return os.statvfs(datadir)


def retention_job(keep_days: int | None, max_bytes: int | None) -> Job:
    def run(conn: db.Conn) -> None:
        _report(apply_retention(conn, keep_days, max_bytes))

    return run


# Where today's rows are written: its partition's tablespace, else the data directory.
_LOG_DIRECTORY = """
SELECT coalesce(nullif(pg_tablespace_location(
           coalesce(nullif(c.reltablespace, 0),
                    (SELECT dattablespace FROM pg_database WHERE datname = current_database()))),
       ''), current_setting('data_directory'))
FROM pg_class c
WHERE c.oid = coalesce(
    to_regclass('pgvpn.packet_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')),
    'pgvpn.packet_default'::regclass)
"""


class FreeSpace:
    """on_disk_full = "drop_oldest": keep min_free bytes available where today's log is written.

    One oldest closed day per run (every few seconds) while space is short, each logged and
    counted: a disk filled by something other than the log costs one day per run, not the
    whole log at once, and today's day is never dropped. Runs next to PostgreSQL: the service
    reads the filesystem itself.
    """

    def __init__(self, min_free: int) -> None:
        self.min_free = min_free
        self.warned = False

    def __call__(self, conn: db.Conn) -> None:
        row = conn.execute(_LOG_DIRECTORY).fetchone()
        assert row is not None
        fs = os.statvfs(str(row[0]))
        avail = fs.f_bavail * fs.f_frsize
        metrics.LOG_FILESYSTEM_AVAIL.set(avail)
        if avail >= self.min_free:
            self.warned = False
            return
        total = conn.execute("SELECT coalesce(sum(bytes), 0) FROM pgvpn.partitions()").fetchone()
        assert total is not None
        # a budget one byte under the log's size: apply_retention drops exactly the oldest day
        dropped = (_report(apply_retention(conn, None, int(total[0]) - 1), "disk_full")
                   if total[0] > 0 else 0)
        if not dropped and not self.warned:
            self.warned = True
            log.warning("retention: %.1f MB left under the log (%s), below --min-free, and no "
                        "closed day of the log is left to drop; the senders drop what cannot "
                        "be logged once the disk is full", avail / 1e6, row[0])


# Peer sessions that hold a transaction open: a pinned NOTIFY queue, a lock that blocks
# partition creation or retention, vacuum held back. A peer can SET away its own timeouts, so
# the watchdog is the bound. An agent's transactions last one batch or one fetch.
_PEER_SESSION = """
  AND a.pid <> pg_backend_pid() AND a.xact_start < now() - make_interval(secs => %s)
  AND EXISTS (SELECT FROM pg_auth_members m
              WHERE m.member = a.usesysid AND m.roleid = 'pgvpn_agent'::regrole)
"""
_LONG_TRANSACTIONS = """
SELECT a.pid, a.usename, a.state, extract(epoch FROM now() - a.xact_start)::float8
FROM pg_stat_activity a
WHERE a.datname = current_database()""" + _PEER_SESSION
# ... and those holding a lock on the log that housekeeping just waited for in vain
_LOG_LOCKERS = """
SELECT DISTINCT a.pid, a.usename, a.state, extract(epoch FROM now() - a.xact_start)::float8
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.granted AND a.datname = current_database()
  AND (l.relation = 'pgvpn.packet'::regclass OR l.relation IN (
       SELECT inhrelid FROM pg_inherits WHERE inhparent = 'pgvpn.packet'::regclass))""" \
    + _PEER_SESSION
# Under NOTIFY queue pressure, and when housekeeping is blocked, a peer's transaction older
# than this is in the way (agents' take milliseconds).
SHORT_TRANSACTION = 5.0
QUEUE_PRESSURE = 0.05


def _end_sessions(conn: db.Conn, query: str, age: float, reason: str) -> int:
    """End the sessions `query` finds, in the same statement (a pid is not reused under it),
    waiting up to 5 s each for them to be gone (and their locks with them)."""
    ended = 0
    rows = conn.execute(f"SELECT s.*, pg_terminate_backend(s.pid, 5000) FROM ({query}) s",
                        (age,)).fetchall()
    for pid, role, state, seconds, terminated in rows:
        if terminated:
            ended += 1
            metrics.WATCHDOG_TERMINATED.labels(reason).inc()
            log.warning("watchdog: ended session %d of %s, %s in a transaction for %.0fs (%s)",
                        pid, role, state, seconds, reason.replace("_", " "))
    return ended


def watchdog(max_transaction: float) -> Job:
    def run(conn: db.Conn) -> None:
        row = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
        if row and row[0] > QUEUE_PRESSURE:
            _end_sessions(conn, _LONG_TRANSACTIONS, min(max_transaction, SHORT_TRANSACTION),
                          "notify_queue")
        _end_sessions(conn, _LONG_TRANSACTIONS, max_transaction, "long_transaction")

    return run


def unblocked(job: Job) -> Job:
    """A job that locks the log: when it waited in vain behind a peer session's transaction
    older than SHORT_TRANSACTION, that session is ended and the job tried once more."""
    def run(conn: db.Conn) -> None:
        try:
            job(conn)
        except psycopg.errors.LockNotAvailable:
            if not _end_sessions(conn, _LOG_LOCKERS, SHORT_TRANSACTION, "blocking_housekeeping"):
                raise
            job(conn)

    return run


def _report(dropped: list[tuple[Any, ...]], reason: str | None = None) -> int:
    """Log and count each dropped partition; `reason` overrides the database's (age, size)."""
    for part, day, size, why, undelivered in dropped:
        why = reason or why
        log.info("retention: dropped %s (%s, %.1f MB) by %s", part, day, size / 1e6, why)
        metrics.RETENTION_DROPPED.labels(why).inc()
        metrics.RETENTION_FREED.labels(why).inc(size)
        if undelivered:
            log.warning("retention: %d rows of %s had not been delivered to their receivers "
                        "(a peer offline or removed); they are gone", undelivered, part)
            metrics.RETENTION_UNDELIVERED.labels(why).inc(undelivered)
    return len(dropped)


def apply_retention(conn: db.Conn, keep_days: int | None,
                    max_bytes: int | None) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT * FROM pgvpn.apply_retention(%s, %s)",
                        (keep_days, max_bytes)).fetchall()


def _connection_class(database: Database) -> type[db.Conn]:
    """Connections that read the password when they connect: the pool keeps its connect
    arguments for its whole life, and a rotated password file must reach the next connection
    it opens without a restart (config.Database.password)."""

    class Connection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            return super().connect(conninfo, **{**kwargs, "password": database.password()})

    return Connection


class Housekeeping:
    def __init__(self, database: Database, retention: Retention, stop: threading.Event,
                 max_transaction: float = 0.0) -> None:
        self.stop = stop
        kwargs = db.connect_kwargs(database, "pgvpn-housekeeping", any_server=True)
        conninfo = kwargs.pop("conninfo")
        del kwargs["password"]
        self.pool: ConnectionPool[db.Conn] = ConnectionPool(
            conninfo, kwargs=kwargs, connection_class=_connection_class(database), min_size=0,
            max_size=2, open=False, name="housekeeping", configure=wire.register,
            timeout=database.connect_timeout)
        self.workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="housekeeping")
        self.role = NodeRole(database, "pgvpn-housekeeping")
        r = retention
        every = {"partitions": 600.0, "indexes": 3600.0, "freeze": 60.0, "limits": 15.0,
                 "retention": r.every, "free_space": 5.0, "watchdog": 5.0}
        run: dict[str, Job] = {"partitions": unblocked(ensure_partitions),
                               "indexes": unblocked(index_closed_days),
                               "freeze": freeze_closed_days, "limits": Limits(),
                               "retention": unblocked(retention_job(r.keep_days, r.max_bytes)),
                               "free_space": unblocked(FreeSpace(r.min_free)),
                               "watchdog": watchdog(max_transaction)}
        self.jobs = [Periodic(name, every[name], run[name])
                     for name in jobs(retention, max_transaction)]

    def run(self) -> None:
        self.pool.open()
        try:
            while not self.stop.is_set():
                self._tick()
                self.stop.wait(1.0)
        finally:
            self.workers.shutdown(wait=True, cancel_futures=True)
            self.pool.close()
            self.role.close()

    def _tick(self) -> None:
        """Submit the jobs that are due: on the primary (or while the node has not answered
        yet: the jobs then fail and say why) all of them, every one due at a promotion; on a
        standby only the read-only limits, since its WAL disk fills as well."""
        was = self.role.primary
        primary = self.role.check()
        metrics.HOUSEKEEPING_ACTIVE.set(primary is not False)
        now = time.monotonic()
        if was is False and primary:
            for job in self.jobs:
                job.due = now
        for job in self.jobs:
            if (now >= job.due and (job.running is None or job.running.done())
                    and (primary is not False or job.name in ON_STANDBYS)):
                job.running = self.workers.submit(self._run, job)

    def _run(self, job: Periodic) -> None:
        started = time.monotonic()
        try:
            with self.pool.connection() as conn:
                job.run(conn)
            job.due = time.monotonic() + job.every
            metrics.HOUSEKEEPING_RUNS.labels(job.name, "ok").inc()
            metrics.HOUSEKEEPING_LAST_OK.labels(job.name).set(time.time())
        except Exception as exc:
            # Any failure, not only the database's: a job that dies silently in its Future
            # would stop being retried, and the log would grow past its budget unnoticed.
            metrics.HOUSEKEEPING_RUNS.labels(job.name, "failed").inc()
            job.due = time.monotonic() + min(60.0, job.every)
            expected = isinstance(exc, psycopg.Error | PoolTimeout | OSError)
            log.log(logging.WARNING if expected else logging.ERROR,
                    "housekeeping: %s failed (%s); next try in %.0fs", job.name,
                    db.describe(exc), job.due - time.monotonic(), exc_info=not expected)
        finally:
            metrics.HOUSEKEEPING_SECONDS.labels(job.name).set(time.monotonic() - started)


def jobs(retention: Retention, max_transaction: float) -> list[str]:
    """Partitions, indexes, freeze and limits always; retention if a limit is set; free_space
    with drop_oldest; the watchdog unless switched off."""
    r = retention
    configured = r.keep_days is not None or r.max_bytes is not None
    return ["partitions", "indexes", "freeze", "limits", *(["retention"] if configured else []),
            *(["free_space"] if r.on_disk_full == "drop_oldest" else []),
            *(["watchdog"] if max_transaction > 0 else [])]


def _warn_unbounded(database: Database) -> None:
    """Say so at start when no daily quota bounds what one peer may log (pgvpn.limits)."""
    try:
        with db.connect(database, "pgvpn-housekeeping") as conn:
            row = conn.execute("SELECT peer_bytes_per_day IS NULL, (SELECT count(*) FROM "
                               "pgvpn.peer WHERE bytes_per_day IS NULL) FROM pgvpn.limits"
                               ).fetchone()
    except psycopg.Error:
        return  # the jobs will say what is wrong with the database
    if row and row[0] and row[1]:
        log.warning("no daily log quota is set (pgvpn.limits.peer_bytes_per_day): a peer that "
                    "bypasses its agent can fill the log's disk; set one (Ansible: "
                    "pgvpn_postgresql_peer_bytes_per_day)")


def serve(database: Database, retention: Retention, max_transaction: float, address: str,
          port: int | None) -> int:
    """Run until SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics.start_housekeeping(jobs(retention, max_transaction), address, port)
    _warn_unbounded(database)
    service = Housekeeping(database, retention, stop, max_transaction)
    log.info("housekeeping: jobs %s%s", ", ".join(j.name for j in service.jobs),
             f"; metrics on http://{address}:{port}/metrics" if port else "")
    service.run()
    return 0
