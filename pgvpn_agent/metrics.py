"""Prometheus metrics, defined once; updated per batch, never per packet (the hot path).

The agent (`pgvpn run`, served on `[metrics] address:port`) and the housekeeping service share
these definitions; the database-side collector (`pgvpn db metrics`) is dbmetrics.py.
"""

from __future__ import annotations

import bisect
import logging
import math
import platform
import threading
from collections.abc import Iterable
from importlib import metadata

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pgvpn_agent.config import Config

log = logging.getLogger(__name__)

# `_created` series double the series count and no dashboard or alert reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Commits take ~1-5 ms with a WAL flush; a fetch or an in-memory commit well under 1 ms; an
# outage holds packets for seconds.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Delivery also covers packets that waited out an outage, up to transport.max_age (30 s).
_DELIVERY_BUCKETS = (*_LATENCY_BUCKETS, 30.0)
DROP_REASONS = ("no_route", "malformed", "queue_full", "too_old", "db_error", "tun_write",
                "rate_limit", "unsealable", "disk_full", "bad_source", "quota", "in_doubt",
                "repeated")
RETENTION_REASONS = ("age", "size", "disk_full")
DIRECTIONS = ("tx", "rx")
CAUSES = ("notify", "poll")
SAVERS = ("sender", "receiver")


class BatchHistogram(Collector):
    """A histogram that takes a whole batch of observations under one lock.

    prometheus_client's Histogram takes a lock per observation; the receiver measures the
    latency of every packet it delivers, so it hands over one sorted list per batch instead.
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float],
                 registry: CollectorRegistry | None = REGISTRY) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(float(b) for b in buckets)
        self._cumulative = [0] * len(self.bounds)
        self._count = 0
        self._sum = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe_batch(self, values: list[float]) -> None:
        """Add values (sorted here, in place); negative values count as 0 (clock skew)."""
        if not values:
            return
        values.sort()
        cumulative = [bisect.bisect_right(values, b) for b in self.bounds]
        total = math.fsum(values[bisect.bisect_left(values, 0.0):])
        with self._lock:
            for i, n in enumerate(cumulative):
                self._cumulative[i] += n
            self._count += len(values)
            self._sum += total

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            cumulative = list(self._cumulative)
            count, total = self._count, self._sum
        buckets: list[tuple[str, float]] = [
            (str(b), float(n)) for b, n in zip(self.bounds, cumulative, strict=True)
        ]
        buckets.append(("+Inf", float(count)))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                    sum_value=total)


BUILD_INFO = Gauge("pgvpn_build_info", "Always 1; the agent's version and Python version.",
                   ["version", "python"])
AGENT_INFO = Gauge("pgvpn_agent_info", "Always 1; this agent's peer name and transport mode.",
                   ["peer", "mode"])

PACKETS = Counter("pgvpn_packets", "IP packets carried, by direction (tx: TUN to database, "
                  "rx: database to TUN) and remote peer.", ["direction", "peer"])
BYTES = Counter("pgvpn_bytes", "IP packet bytes carried (IP header included), by direction "
                "and remote peer.", ["direction", "peer"])
LAST_PACKET = Gauge("pgvpn_last_packet_timestamp_seconds", "Unix time (agent clock) of the "
                    "last batch that carried packets to (tx) or from (rx) the remote peer.",
                    ["direction", "peer"])
DROPPED = Counter("pgvpn_packets_dropped", "Packets not carried, by reason: no_route (no peer "
                  "owns the destination), malformed, queue_full (oldest dropped while the "
                  "database was away), too_old (logged but older than transport.max_age), "
                  "db_error (batch refused by the database), tun_write (TUN refused it), "
                  "rate_limit (over this agent's transport.rate_limit_packets/_bytes), "
                  "unsealable (encrypted row that failed authentication or has an unknown key), "
                  "disk_full (the database's disk is full: not logged), bad_source (a stored "
                  "packet whose source address is not among its sender's addresses and routes), "
                  "quota (over this peer's daily log quota, pgvpn.limits), in_doubt (the batch in "
                  "flight at a failover: not on the new primary, perhaps read on the old one; "
                  "not sent again), repeated (a stored packet whose link sequence number the "
                  "log holds twice, from rows not written by send_batch(): delivered once).",
                  ["reason"])

BATCHES = Counter("pgvpn_insert_batches", "Sender transactions that logged a batch of packets "
                  "(payload mode: that notified one).")
ROWS = Counter("pgvpn_rows_inserted", "Rows inserted into pgvpn.packet (0 in payload mode).")
BURSTS_JOINED = Counter("pgvpn_tcp_bursts_joined", "TCP bursts read from the TUN that went into "
                        "the row of an earlier burst of their flow (tun.join_bursts): rows "
                        "saved.")
BATCH_SIZE = Histogram("pgvpn_insert_batch_size_packets", "Packets per sender transaction.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
INSERT_SECONDS = Histogram("pgvpn_insert_duration_seconds", "Wall time of one batch "
                           "transaction, insert and commit (WAL flush) included.",
                           buckets=_LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("pgvpn_queue_depth_packets", "Packets read from TUN waiting to be logged.")
RATE_LIMIT_PACKETS = Gauge("pgvpn_send_rate_limit_packets_per_second", "This agent's send limit "
                           "(transport.rate_limit_packets); 0: unlimited.")
RATE_LIMIT_BYTES = Gauge("pgvpn_send_rate_limit_bytes_per_second", "This agent's send limit in "
                         "IP packet bytes (transport.rate_limit_bytes); 0: unlimited.")

FETCH_SECONDS = Histogram("pgvpn_fetch_duration_seconds", "Wall time of one fetch of new rows "
                          "for this peer (one query over every incoming link).",
                          buckets=_LATENCY_BUCKETS)
DELIVERY_SECONDS = BatchHistogram(
    "pgvpn_delivery_latency_seconds", "Per packet, from its commit in the log to the write to "
    "this receiver's TUN: the row's age by the database's clock (logged_at) when fetched, plus "
    "this host's time to write the page. No two hosts' clocks are compared. Packets carried "
    "by their notification (pgvpn_carried_packets_total) are not in it.", _DELIVERY_BUCKETS)
WAKEUPS = Counter("pgvpn_receiver_wakeups", "Receiver wake-ups, by cause: notify (a "
                  "notification arrived) or poll (transport.poll_interval passed without one).",
                  ["cause"])
CARRIED = Counter("pgvpn_carried_packets", "Packets delivered from the notification of their "
                  "batch, without a fetch (small sealed batches, schema v14); the table was "
                  "read for every other one.")
CARRIED_REFUSED = Counter("pgvpn_carried_refused", "Notifications whose carried rows did not "
                          "open with the pair's key (not written by send_batch(), or keys "
                          "that differ): nothing of them was delivered, the table was read.")
CURSOR_SAVES = Counter("pgvpn_cursor_saves", "Commits of this agent's receiver cursors, by who "
                       "made them: sender (carried by a batch of packets going back, no "
                       "transaction of their own) or receiver (none went back within "
                       "transport.save_delay).", ["by"])
LAG_PACKETS = Gauge("pgvpn_cursor_lag_packets", "Packets logged on the link from the peer to "
                    "this agent but not yet delivered (link.tx_seq minus the receiver's cursor), "
                    "sampled every few seconds.", ["peer"])
LAG_SECONDS = Gauge("pgvpn_cursor_lag_seconds", "Age of the oldest packet logged on the link "
                    "from the peer but not yet delivered, by the database clock (now minus its "
                    "logged_at); 0 when caught up. Sampled every few seconds.", ["peer"])

RECONNECTS = Counter("pgvpn_db_reconnects", "Database connections re-established after a loss, "
                     "by direction (tx: sender, rx: receiver).", ["direction"])
DB_DISK_FULL = Gauge("pgvpn_db_disk_full", "1 while the database refuses this agent's inserts "
                     "for lack of disk space (new packets are dropped as disk_full).")
DB_UP = Gauge("pgvpn_db_up", "1 while the direction's database connection is usable.",
              ["direction"])
TIMELINE = Gauge("pgvpn_db_timeline", "Timeline of the database server the sender is connected "
                 "to (up by one at every promotion: a failover or a switchover).")
TIMELINE_CHANGES = Counter("pgvpn_db_timeline_changes", "Reconnects of the sender to a server on "
                           "another timeline than before (a failover or a switchover).")
IN_DOUBT = Counter("pgvpn_commits_in_doubt", "Batches whose commit is in doubt: warned (the "
                   "server committed locally but cancelled the wait for its synchronous "
                   "standby) or in_flight (connection lost during the commit, then a new "
                   "primary without it).", ["cause"])
IN_DOUBT_REPLAYED = Counter("pgvpn_in_doubt_batches_replayed", "Batches in doubt after a "
                            "failover sent again with their own sequence numbers (delivered "
                            "once: a receiver that read them on the old primary skips them).")
WOKEN_AFTER_COMMIT = Counter("pgvpn_batches_woken_after_commit", "Batches whose receivers were "
                             "woken in a transaction of their own after the batch's commit "
                             "(transport.wake after_commit, or auto for a flow's bursts and "
                             "its ACKs); the rest notify inside it.")
UNNOTIFIED = Counter("pgvpn_unnotified_batches", "Batches logged without waking their receivers "
                     "because the database's NOTIFY queue was full (receivers find them by "
                     "polling, transport.poll_interval).")

RETENTION_DROPPED = Counter("pgvpn_retention_partitions_dropped", "Day partitions of the packet "
                            "log housekeeping dropped, by reason (age: older than --keep-days; "
                            "size: over --max-size; disk_full: the oldest day, to keep --min-free "
                            "bytes available, --on-disk-full drop_oldest).", ["reason"])
RETENTION_FREED = Counter("pgvpn_retention_freed_bytes", "Bytes of packet log (table, indexes, "
                          "TOAST) freed by those drops, by reason.", ["reason"])
RETENTION_UNDELIVERED = Counter("pgvpn_retention_undelivered_rows", "Rows those drops removed "
                                "before their receiver had read them (past its cursor: a peer "
                                "offline or removed), by reason.", ["reason"])
SEQUENCE_REGRESSIONS = Counter("pgvpn_sequence_regressions", "Reconnects at which the database's "
                               "sequence of a link was behind what this sender had seen "
                               "committed: the database lost commits (a restore, a failover, "
                               "asynchronous commits), by remote peer.", ["peer"])
DELIVERED_AHEAD = Counter("pgvpn_delivered_ahead_of_database", "Reconnects at which a link "
                          "was behind what this receiver had delivered: it read rows on a "
                          "primary that lost them (sent again with the same numbers, or skipped "
                          "by their sender), by remote peer.", ["peer"])
SEQUENCE_GAPS = Counter("pgvpn_sequence_gap_packets", "Sequence numbers a receiver found missing "
                        "on a link (rows the log lost: retention, a restore), by remote peer.",
                        ["peer"])
HOUSEKEEPING_RUNS = Counter("pgvpn_housekeeping_runs", "Housekeeping job runs (partitions ahead "
                            "of time, indexes on closed days, retention, free_space, watchdog), "
                            "by job and result (ok, failed).",
                            ["job", "result"])
WATCHDOG_TERMINATED = Counter("pgvpn_watchdog_terminated_sessions", "Peer sessions housekeeping's "
                              "watchdog ended, by reason: long_transaction (open longer than "
                              "--max-transaction; a peer can SET away its own timeouts), "
                              "notify_queue (open over 5 s while the NOTIFY queue fills), "
                              "blocking_housekeeping (holding a lock on the log that "
                              "partitions, indexes or retention waited for).", ["reason"])
WATCHDOG_REASONS = ("long_transaction", "notify_queue", "blocking_housekeeping")
LOG_FILESYSTEM_AVAIL = Gauge("pgvpn_log_filesystem_avail_bytes", "Bytes available on the "
                             "filesystem today's log partition is written to (free_space job).")
HOUSEKEEPING_ACTIVE = Gauge("pgvpn_housekeeping_active", "1 while this instance's database "
                            "node is the primary (or has not answered yet) and its jobs run; 0 "
                            "on a standby, where they wait.")
HOUSEKEEPING_LAST_OK = Gauge("pgvpn_housekeeping_last_success_timestamp_seconds", "Unix time of "
                             "each housekeeping job's last successful run (0: none yet).",
                             ["job"])
HOUSEKEEPING_SECONDS = Gauge("pgvpn_housekeeping_last_duration_seconds", "Wall time of each "
                             "housekeeping job's last run, successful or not (a retention run "
                             "that drops a large day takes longer, and so does its lock wait).",
                             ["job"])

# The database's own limits (housekeeping's limits and freeze jobs; docs/monitoring.md)
DATABASE_XID_AGE = Gauge("pgvpn_database_xid_age", "Transactions since the oldest unfrozen "
                         "transaction id of the pgvpn database (age(datfrozenxid)). "
                         "Anti-wraparound vacuums start at autovacuum_freeze_max_age; PostgreSQL "
                         "refuses new transactions 3M short of 2^31.")
DATABASE_FREEZE_MAX_AGE = Gauge("pgvpn_database_autovacuum_freeze_max_age", "The server's "
                                "autovacuum_freeze_max_age, in transactions.")
DATABASE_TRANSACTION_IDS = Gauge("pgvpn_database_transaction_ids", "Transaction ids the cluster "
                                 "has assigned (the 64-bit next id); its rate is what the "
                                 "tunnel consumes: one per batch and per cursor commit.")
XMIN_HORIZON_AGE = Gauge("pgvpn_database_xmin_horizon_age", "Transactions vacuum is held back "
                         "by: the oldest snapshot or transaction id of a session of this "
                         "database, a replication slot or a prepared transaction. Dead rows "
                         "newer than it stay, rows older than it are not frozen.")
OLDEST_TRANSACTION = Gauge("pgvpn_database_oldest_transaction_seconds", "Age of the oldest open "
                           "transaction of a client session of this database (a pg_dump, a "
                           "forgotten psql); 0 if none.")
WAL_SIZE_LIMIT = Gauge("pgvpn_wal_size_limit_bytes", "What the server's settings bound pg_wal "
                       "to: max_wal_size plus the larger of wal_keep_size and "
                       "max_slot_wal_keep_size; +Inf when max_slot_wal_keep_size is -1 (a "
                       "replication slot may keep WAL without limit). A failing archiver is "
                       "not bounded by any of them.")
WAL_ARCHIVE_PENDING = Gauge("pgvpn_wal_archive_pending_segments", "WAL segments waiting for "
                            "archive_command (pg_wal/archive_status/*.ready): each stays in "
                            "pg_wal until archived.")
WAL_FILESYSTEM_AVAIL = Gauge("pgvpn_wal_filesystem_avail_bytes", "Bytes available on the "
                             "filesystem of pg_wal. When it is full PostgreSQL stops (PANIC).")
WAL_FILESYSTEM_SIZE = Gauge("pgvpn_wal_filesystem_size_bytes", "Size of the filesystem of "
                            "pg_wal.")
HOT_TABLE_DEAD_ROWS = Gauge("pgvpn_hot_table_dead_rows", "Dead row versions in the tables every "
                            "batch updates (link: tx_seq, cursor: rx_seq, usage: the daily "
                            "quota), by table: they pile up while vacuum is held back.",
                            ["table"])
HOT_TABLE_SIZE = Gauge("pgvpn_hot_table_size_bytes", "Disk size of those tables, indexes "
                       "included, by table.", ["table"])
LOG_UNFROZEN_DAYS = Gauge("pgvpn_log_unfrozen_partitions", "Closed days of the packet log not "
                          "frozen yet (the freeze job): each still costs a rewrite of every page "
                          "when its anti-wraparound vacuum comes.")
LOG_UNFROZEN_AGE = Gauge("pgvpn_log_unfrozen_closed_day_xid_age", "Age in transactions of the "
                         "oldest closed day not frozen yet (0: none); at "
                         "autovacuum_freeze_max_age autovacuum freezes it on its own.")


def start(config: Config) -> None:
    """Publish the agent's identity, give every bounded label its series, serve if enabled.

    Series that exist from the start (at 0) make rate() and the alerts work before the first
    drop or reconnect ever happens.
    """
    BUILD_INFO.labels(_version(), platform.python_version()).set(1)
    AGENT_INFO.labels(config.peer, config.mode).set(1)
    for direction in DIRECTIONS:
        RECONNECTS.labels(direction)
        DB_UP.labels(direction)
        for peer in config.others:
            PACKETS.labels(direction, peer.name)
            BYTES.labels(direction, peer.name)
    for peer in config.others:
        SEQUENCE_GAPS.labels(peer.name)
        SEQUENCE_REGRESSIONS.labels(peer.name)
        DELIVERED_AHEAD.labels(peer.name)
    for reason in DROP_REASONS:
        DROPPED.labels(reason)
    for cause in ("warned", "in_flight"):
        IN_DOUBT.labels(cause)
    RATE_LIMIT_PACKETS.set(config.transport.rate_limit_packets)
    RATE_LIMIT_BYTES.set(config.transport.rate_limit_bytes)
    for cause in CAUSES:
        WAKEUPS.labels(cause)
    for saver in SAVERS:
        CURSOR_SAVES.labels(saver)
    if config.metrics.enabled:
        start_http_server(config.metrics.port, config.metrics.address)


def start_housekeeping(jobs: Iterable[str], address: str, port: int | None) -> None:
    """The housekeeping service's series (pgvpn db housekeeping), served if a port is given."""
    BUILD_INFO.labels(_version(), platform.python_version()).set(1)
    for reason in RETENTION_REASONS:
        RETENTION_DROPPED.labels(reason)
        RETENTION_FREED.labels(reason)
        RETENTION_UNDELIVERED.labels(reason)
    for why in WATCHDOG_REASONS:
        WATCHDOG_TERMINATED.labels(why)
    for job in jobs:
        HOUSEKEEPING_LAST_OK.labels(job)
        HOUSEKEEPING_SECONDS.labels(job)
        for result in ("ok", "failed"):
            HOUSEKEEPING_RUNS.labels(job, result)
    if port:
        start_http_server(port, address)


def _version() -> str:
    try:
        return metadata.version("pgvpn-agent")
    except metadata.PackageNotFoundError:
        return "unknown"
