"""`pgvpn db metrics`: what no single agent can see, from one process next to each PostgreSQL node.

The log's size, the disk under it, the notification queue; and, because with Patroni every
database host runs one, the node's role, its timeline and its standbys. It connects to its node
whatever the node's role (target_session_attrs=any unless the dsn says otherwise): the standbys'
exporters are how the dashboard shows which node leads, and an exporter that refused a standby
would look like a dead node.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pgvpn_agent import db
from pgvpn_agent.config import Database

log = logging.getLogger(__name__)

_PARTITIONS = """
SELECT c.relname, coalesce(s.n_live_tup, 0), pg_total_relation_size(c.oid)
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE i.inhparent = (SELECT t.oid FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
                     WHERE n.nspname = 'pgvpn' AND t.relname = 'packet')
"""
_DATABASE = ("SELECT pg_database_size(current_database()), pg_notification_queue_usage(), "
             "pg_is_in_recovery()")
# Both need pg_monitor (or superuser); without it the collector leaves those metrics out.
_WAL = "SELECT coalesce(sum(size), 0) FROM pg_ls_waldir()"
_DATA_DIRECTORY = "SELECT current_setting('data_directory')"
# The primary's timeline is in the name of the WAL file it writes (pgvpn.timeline() reads it
# the same way); a standby has no current WAL file: it follows the timeline it receives, or
# its last restartpoint's while no WAL receiver runs.
_PRIMARY_TIMELINE = ("SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))"
                     "::bit(32)::integer")
_STANDBY = """
SELECT coalesce(r.received_tli, (pg_control_checkpoint()).timeline_id),
       coalesce(r.status = 'streaming', false),
       coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)
FROM (SELECT 1) one LEFT JOIN pg_stat_wal_receiver r ON true
"""
# Without pg_read_all_stats (pg_monitor has it) the positions read NULL: no lag is shown then.
# A NULL replay_lag means caught up (PostgreSQL clears it once the standby is idle and current).
_STANDBYS = """
SELECT application_name, coalesce(host(client_addr), 'local'), state, sync_state,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn),
       coalesce(extract(epoch FROM replay_lag), 0)
FROM pg_stat_replication
"""


class DatabaseCollector(Collector):
    """Database-wide numbers, queried at scrape time over a fresh short connection.

    Catalog and statistics reads only: row counts are the statistics' live-tuple estimates (an
    exact count(*) of a day of packets would cost more than the scrape is worth).
    """

    def __init__(self, database: Database, timeout: float = 5.0) -> None:
        self.database = database
        self.timeout = timeout

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pgvpn_database_up", "1 if the last scrape could query the "
                               "pgvpn database.")
        families: list[Metric] = []
        try:
            with db.connect(self.database, "pgvpn-metrics", any_server=True) as conn:
                conn.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
                families = list(self._query(conn))
        except psycopg.Error as exc:
            log.warning("database metrics: %s", db.describe(exc))
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield from families
        yield up

    def _query(self, conn: db.Conn) -> Iterator[Metric]:
        rows = GaugeMetricFamily("pgvpn_log_partition_rows", "Rows in each partition of "
                                 "pgvpn.packet (live-tuple estimate of the statistics).",
                                 labels=["partition"])
        size = GaugeMetricFamily("pgvpn_log_partition_size_bytes", "Disk size of each partition "
                                 "of pgvpn.packet, indexes and TOAST included.",
                                 labels=["partition"])
        for name, n, nbytes in conn.execute(_PARTITIONS):
            rows.add_metric([str(name)], float(n))
            size.add_metric([str(name)], float(nbytes))
        yield rows
        yield size
        row = conn.execute(_DATABASE).fetchone()
        assert row is not None
        yield GaugeMetricFamily("pgvpn_database_size_bytes", "Disk size of the pgvpn database.",
                                value=float(row[0]))
        yield GaugeMetricFamily("pgvpn_notification_queue_usage_ratio", "Fraction of the "
                                "cluster's NOTIFY queue in use (pg_notification_queue_usage()); "
                                "at 1 every NOTIFY fails.",
                                value=float(row[1]))
        yield from _replication(conn, in_recovery=bool(row[2]))
        try:
            wal = conn.execute(_WAL).fetchone()
            datadir = conn.execute(_DATA_DIRECTORY).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            return
        assert wal is not None and datadir is not None
        yield GaugeMetricFamily("pgvpn_wal_size_bytes", "Size of the WAL directory (pg_wal).",
                                value=float(wal[0]))
        try:
            fs = os.statvfs(str(datadir[0]))
        except OSError:
            return  # the database runs on another host: its disk is not ours to see
        yield GaugeMetricFamily("pgvpn_database_filesystem_avail_bytes", "Bytes available to "
                                "PostgreSQL on the filesystem of its data directory.",
                                value=float(fs.f_bavail * fs.f_frsize))
        yield GaugeMetricFamily("pgvpn_database_filesystem_size_bytes", "Size of the "
                                "filesystem of PostgreSQL's data directory.",
                                value=float(fs.f_blocks * fs.f_frsize))


def _replication(conn: db.Conn, in_recovery: bool) -> Iterator[Metric]:
    """The node's role and timeline; the primary's standbys, or a standby's own stream."""
    yield GaugeMetricFamily("pgvpn_database_in_recovery", "1 on a standby, 0 on the primary "
                            "(pg_is_in_recovery()).", value=float(in_recovery))
    if in_recovery:
        timeline, streaming, pending = _one(conn, _STANDBY)
        yield GaugeMetricFamily("pgvpn_replication_receiving", "1 while this standby streams "
                                "WAL from a primary (pg_stat_wal_receiver).",
                                value=float(bool(streaming)))
        yield GaugeMetricFamily("pgvpn_replication_replay_pending_bytes", "WAL this standby "
                                "has received and not replayed yet.", value=float(pending))
    else:
        (timeline,) = _one(conn, _PRIMARY_TIMELINE)
        info = GaugeMetricFamily("pgvpn_replication_standby_info", "One series per standby "
                                 "connected to this primary (pg_stat_replication).",
                                 labels=["application_name", "client_addr", "state",
                                         "sync_state"])
        lag = GaugeMetricFamily("pgvpn_replication_lag_bytes", "WAL the primary has written "
                                "that this standby has not replayed yet.",
                                labels=["application_name"])
        lag_seconds = GaugeMetricFamily("pgvpn_replication_lag_seconds", "Time from a commit "
                                        "on the primary to its replay on this standby "
                                        "(replay_lag; 0 once caught up).",
                                        labels=["application_name"])
        synchronous = 0
        for name, addr, state, sync_state, behind, seconds in conn.execute(_STANDBYS):
            info.add_metric([str(name), str(addr), str(state), str(sync_state)], 1.0)
            synchronous += sync_state in ("sync", "quorum")
            if behind is not None:
                lag.add_metric([str(name)], float(behind))
                lag_seconds.add_metric([str(name)], float(seconds))
        yield info
        yield lag
        yield lag_seconds
        yield GaugeMetricFamily("pgvpn_replication_synchronous_standbys", "Standbys whose "
                                "confirmation this primary's commits wait for.",
                                value=float(synchronous))
    yield GaugeMetricFamily("pgvpn_database_timeline", "This node's timeline: up by one at "
                            "every promotion in the cluster.", value=float(timeline))


def _one(conn: db.Conn, query: str) -> tuple[Any, ...]:
    row = conn.execute(query).fetchone()
    assert row is not None
    return tuple(row)


def serve(database: Database, address: str, port: int) -> int:
    """Serve DatabaseCollector until SIGTERM/SIGINT."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(database))
    server, _ = start_http_server(port, address, registry=registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("database metrics on http://%s:%d/metrics", address, port)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    return 0
