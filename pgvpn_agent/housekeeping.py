"""Database work that is not on any packet's path: partitions ahead of time, retention.

It runs on its own small connection pool and thread pool, so a slow DROP or a reconnect here
never stalls the sender or the receiver, and a failure costs one period, never a packet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from pgvpn_agent import db, metrics, wire
from pgvpn_agent.config import Config

log = logging.getLogger(__name__)

Job = Callable[[db.Conn], None]


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


def retention(keep_days: int | None, max_bytes: int | None) -> Job:
    def run(conn: db.Conn) -> None:
        _report(apply_retention(conn, keep_days, max_bytes))

    return run


class FreeSpace:
    """retention.on_disk_full = "drop_oldest": make room when the sender's inserts hit a full disk.

    One oldest closed day per failure the sender reports: after a drop the signal is cleared,
    and only a further failed insert (the disk is still full) asks for the next day. So an idle
    tunnel drops nothing more, and a disk filled by something other than the log costs one day
    per try, each logged and counted, not the whole log at once.
    """

    def __init__(self, disk_full: threading.Event) -> None:
        self.disk_full = disk_full
        self.warned = False

    def __call__(self, conn: db.Conn) -> None:
        if not self.disk_full.is_set():
            self.warned = False
            return
        row = conn.execute("SELECT coalesce(sum(bytes), 0) FROM pgvpn.partitions()").fetchone()
        assert row is not None
        # a budget one byte under the log's size: apply_retention drops exactly the oldest day
        if _report(apply_retention(conn, None, int(row[0]) - 1), "disk_full"):
            self.disk_full.clear()
        elif not self.warned:
            self.warned = True
            log.warning("retention: the database's disk is full and no day of the log could be "
                        "dropped (only the current day is left, or another agent's retention "
                        "run holds the lock); packets are dropped until space is freed")


def _report(dropped: list[tuple[Any, ...]], reason: str | None = None) -> int:
    """Log and count each dropped partition; `reason` overrides the database's (age, size)."""
    for part, day, size, why in dropped:
        why = reason or why
        log.info("retention: dropped %s (%s, %.1f MB) by %s", part, day, size / 1e6, why)
        metrics.RETENTION_DROPPED.labels(why).inc()
        metrics.RETENTION_FREED.labels(why).inc(size)
    return len(dropped)


def apply_retention(conn: db.Conn, keep_days: int | None,
                    max_bytes: int | None) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT * FROM pgvpn.apply_retention(%s, %s)",
                        (keep_days, max_bytes)).fetchall()


class Housekeeping:
    def __init__(self, config: Config, stop: threading.Event,
                 disk_full: threading.Event) -> None:
        self.stop = stop
        kwargs = db.connect_kwargs(config.database, f"pgvpn-{config.peer}-jobs")
        conninfo = kwargs.pop("conninfo")
        self.pool: ConnectionPool[db.Conn] = ConnectionPool(
            conninfo, kwargs=kwargs, min_size=0, max_size=2, open=False, name="housekeeping",
            configure=wire.register, timeout=config.database.connect_timeout)
        self.workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="housekeeping")
        r = config.retention
        # free_space only acts while the sender reports a full disk; it checks often so the
        # tunnel is back within seconds of a drop.
        every = {"partitions": 3600.0, "indexes": 3600.0, "retention": r.every, "free_space": 5.0}
        run: dict[str, Job] = {"partitions": ensure_partitions, "indexes": index_closed_days,
                               "retention": retention(r.keep_days, r.max_bytes),
                               "free_space": FreeSpace(disk_full)}
        self.jobs = [Periodic(name, every[name], run[name])
                     for name in metrics.housekeeping_jobs(config)]

    def run(self) -> None:
        self.pool.open()
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                for job in self.jobs:
                    if now >= job.due and (job.running is None or job.running.done()):
                        job.running = self.workers.submit(self._run, job)
                self.stop.wait(1.0)
        finally:
            self.workers.shutdown(wait=True, cancel_futures=True)
            self.pool.close()

    def _run(self, job: Periodic) -> None:
        started = time.monotonic()
        try:
            with self.pool.connection() as conn:
                job.run(conn)
            job.due = time.monotonic() + job.every
            metrics.HOUSEKEEPING_RUNS.labels(job.name, "ok").inc()
            metrics.HOUSEKEEPING_LAST_OK.labels(job.name).set(time.time())
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            metrics.HOUSEKEEPING_RUNS.labels(job.name, "failed").inc()
            job.due = time.monotonic() + min(60.0, job.every)
            log.warning("housekeeping: %s failed (%s); next try in %.0fs", job.name,
                        db.describe(exc), job.due - time.monotonic())
        finally:
            metrics.HOUSEKEEPING_SECONDS.labels(job.name).set(time.monotonic() - started)
