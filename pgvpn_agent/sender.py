"""TUN -> database: drain the kernel queue, parse, route, log one batch per transaction.

One sender thread per agent is the single writer of every link that starts at this peer: the
per-link sequence numbers it assigns are committed in order, which is what lets receivers read
`seq > cursor` without ever skipping a row (DESIGN.md trap 1) or reordering packets (trap 2).
"""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from math import inf

import psycopg

from pgvpn_agent import bursts, db, faults, metrics, payload, seal, tun, wire
from pgvpn_agent.config import Config
from pgvpn_agent.delivered import Delivered
from pgvpn_agent.highwater import HighWater
from pgvpn_agent.packet import MalformedPacket, parse
from pgvpn_agent.ratelimit import RateLimit
from pgvpn_agent.reconnect import LinkRecovery, holds
from pgvpn_agent.stopping import Stop

log = logging.getLogger(__name__)
DISK_FULL = "53100"
QUOTA = "PV002"  # pgvpn.send_batch(): over this peer's daily log quota
# "too many notifications in the NOTIFY queue": a listener somewhere holds the cluster-wide
# queue; batches go unnotified for a while and receivers find them by polling.
QUEUE_FULL = "54000"
UNNOTIFIED_FOR = 10.0
RELINK_EVERY = 5.0

SEND_BATCH = "SELECT pgvpn.send_batch(%b::int2, " + ", ".join(["%b"] * 19) + ")"
# send_batch() without its NOTIFY, committed, then wake() in a transaction of its own: one round
# trip (migration 0016)
SEND_AND_WAKE = "CALL pgvpn.send_and_wake(%b::int2, " + ", ".join(["%b"] * 18) + ")"

Captured = payload.Captured
# With TUN offload a packet can be a 64 KB burst: batches and the queue are bounded in bytes too,
# which is what keeps the agent's memory flat (a batch costs about three copies of itself).
BATCH_BYTES = 1 << 20
QUEUE_BYTES = 16 << 20
# Coalescing applies to reads that found fewer packets than this (or than batch_max).
COALESCE_BELOW = 16
# "auto" (wakes_in_commit): a batch of more than SMALL bytes within QUIET seconds of the one
# before is a flow's data; any batch within QUIET of a page of at least delivered.BULK bytes
# written the other way, a flow's ACKs.
QUIET = 0.05
SMALL = 4096
# At most one warning this often for wake-ups that failed after their batch's commit.
WARN_EVERY = 10.0


def wakes_in_commit(wake: str, from_idle: bool, since_batch: float = float("inf"),
                    size: int = 0, since_bulk: float = float("inf")) -> bool:
    """Whether a batch's NOTIFY goes inside its own transaction.

    Inside, the receiver hears of the batch a little sooner (and a small batch rides in the
    notification itself, carried.py), but the commit holds the cluster-wide notification lock
    through its WAL flush, so every other notifying commit of the cluster queues behind it.
    "auto" keeps it for a batch whose first packet the sender waited for (a ping, a keystroke,
    a request, a stream of small datagrams) and moves it out for the traffic of a flow: packets
    already waiting when the previous batch was done, a big batch just after another (a paced
    flow's next burst: `since_batch` seconds, `size` bytes), and anything sent just after the
    receiver wrote a big page (`since_bulk`: the flow's ACKs). With many peers those two
    notified inside their commits and queued on the lock: some flows ran at a third of
    others' rate.
    """
    if wake != "auto":
        return wake == "in_commit"
    flow = since_batch < QUIET and size > SMALL
    return from_idle and not flow and since_bulk >= QUIET


class Sender(LinkRecovery):
    def __init__(self, config: Config, tun: tun.Tun, stop: Stop,
                 delivered: Delivered | None = None) -> None:
        self.config = config
        # The receiver's cursors, carried by the next batch (pgvpn_agent/delivered.py).
        self.delivered = delivered if delivered is not None else Delivered()
        self.tun = tun
        self.stop = stop
        self.routes = config.route_table()
        self.rate_limit = RateLimit.from_config(config)
        self.sealer = seal.for_config(config)
        self.queue: deque[Captured] = deque()
        self.queued_bytes = 0
        self.pending: list[Captured] = []
        self.conn: db.Conn | None = None
        self.backoff = db.Backoff()
        # Paces retries while the database's disk is full or this peer is over its quota (the
        # connection itself is fine).
        self.no_space = db.Backoff(first=0.5)
        self.refused_for = ""  # "disk_full" or "quota" while no_space paces retries
        self.notify_again_at = 0.0
        self.ids: dict[str, int] = {}
        self.names: dict[int, str] = {}
        self.tx_seq: dict[int, int] = {}
        self.highwater = HighWater(config.transport.state_file)
        # The server's timeline at the last connect, and the last sequence number per link of
        # the batch whose send_batch() is in flight: its fate is in doubt if the connection
        # drops and the next server is on another timeline.
        self.timeline: int | None = None
        self.in_flight: dict[int, tuple[int, int]] = {}
        # That batch, first and last number per link, when a failover left it in doubt and it
        # is sent again with those same numbers (reconnect.py).
        self.replay: dict[int, tuple[int, int]] = {}
        # Packets for a configured peer whose link is gone (removed by the operator): its links
        # are read again now and then, so that it is carried again once it is registered back.
        self.unlinked = False
        self.links_read_at = 0.0
        self.connected_once = False
        self.notify = config.mode == "logged"
        # NOTIFY inside the batch's transaction, or in one of its own after it (migration 0013)
        self.wake = config.transport.wake
        self.from_idle = True  # the next batch's first packet was waited for
        self.sent_at = -inf  # time.monotonic() of the last batch's commit
        self.wake_warned_at = -WARN_EVERY
        self.wakes_failed = 0  # since the last warning
        self.waited_batches = 0  # batches in a row whose first packet was already waiting
        self._send = self._send_payloads if config.mode == "payload" else self._send_rows

    def run(self) -> None:
        fd = self.tun.fd
        watch = [fd, self.stop.fileno()]
        poll = self.config.transport.poll_interval
        coalesce = self.config.transport.coalesce
        few = min(COALESCE_BELOW, self.config.transport.batch_max)
        try:
            while not self.stop.is_set():
                if self.conn is None and self.backoff.due():
                    self._connect()
                if self.conn is None:
                    timeout = min(poll, self.backoff.wait_time())
                elif not self.no_space.due():
                    timeout = min(poll, self.no_space.wait_time())
                else:
                    timeout = 0.0 if self.queue or self.pending else poll
                ready, _, _ = select.select(watch, [], [], 0)
                if not (self.queue or self.pending):
                    # the next batch starts here: were its packets already waiting?
                    self.from_idle = fd not in ready
                if not ready and timeout:
                    ready, _, _ = select.select(watch, [], [], timeout)
                if fd in ready:
                    self._drain()
                    if coalesce and len(self.queue) < few and not self.pending:
                        # A few packets: the rest of their train (a receiver's ACKs for a page
                        # of data) is a fraction of a millisecond behind. One transaction for
                        # all of them costs that much latency and saves a commit, a NOTIFY and
                        # a fetch per packet or two (docs/config.md, Coalescing).
                        time.sleep(coalesce)
                        self._drain()
                if self.conn is not None and self.no_space.due():
                    self._flush()
                self.highwater.flush()
        finally:
            self.highwater.flush(force=True)
            self.highwater.close()
            if self.conn is not None:
                self.conn.close()
            metrics.DB_UP.labels("tx").set(0)

    def _drain(self) -> None:
        """Read what the kernel has queued; while the database is away keep only the newest."""
        writing = self.conn is not None and self.no_space.due()
        limit = self.config.transport.batch_max if writing else None
        queue = self.queue
        cap = self.config.transport.queue_max
        read = self.tun.read
        now = time.time()
        dropped = limited = 0
        queued = self.queued_bytes
        bucket = self.rate_limit
        if bucket is not None:
            bucket.refill(time.monotonic())
        while limit is None or (len(queue) < limit and queued < BATCH_BYTES):
            packet = read()
            if packet is None:
                break
            size = len(packet) - tun.VNET_SIZE
            if bucket is not None and not bucket.take(size):
                limited += 1
                continue
            while queue and (len(queue) >= cap or queued + size > QUEUE_BYTES):
                queued -= len(queue.popleft()[1]) - tun.VNET_SIZE
                dropped += 1
            queue.append((now, packet))
            queued += size
        self.queued_bytes = queued
        if dropped:
            metrics.DROPPED.labels("queue_full").inc(dropped)
        if limited:
            metrics.DROPPED.labels("rate_limit").inc(limited)
        metrics.QUEUE_DEPTH.set(len(queue))

    def _flush(self) -> None:
        batch_max = self.config.transport.batch_max
        while self.conn is not None and (self.pending or self.queue):
            try:
                if self.replay and not self.pending:
                    # the batch in doubt was refused or failed: its numbers are skipped
                    # before the next batch is numbered
                    self._skip_replay(self.conn, self.tx_seq, self.replay)
                if not self.pending:
                    self.pending = self._take(batch_max)
                self._send(self.pending)
            except psycopg.Error as exc:
                if self._queue_full(exc) or self._relinked(exc):
                    continue
                if self._refused(exc) or self._lost(exc):
                    return
                log.error("sender: batch of %d packets refused by the database: %s",
                          len(self.pending), db.describe(exc))
                metrics.DROPPED.labels("db_error").inc(len(self.pending))
            else:
                if self.no_space.attempt:
                    log.warning("sender: the database takes this peer's packets again (%s "
                                "over); logging resumed", self.refused_for)
                    self.no_space.succeeded()
                    metrics.DB_DISK_FULL.set(0)
            self.pending = []
            if self.unlinked and time.monotonic() - self.links_read_at > RELINK_EVERY:
                self.unlinked = False
                try:
                    self._read_links()
                except psycopg.Error as exc:
                    self._lost(exc)
                    return
        metrics.QUEUE_DEPTH.set(len(self.queue))

    def _take(self, batch_max: int) -> list[Captured]:
        """The next batch: up to batch_max packets and about BATCH_BYTES (at least one)."""
        queue = self.queue
        batch = [queue.popleft()]
        size = len(batch[0][1])
        while queue and len(batch) < batch_max and size < BATCH_BYTES:
            batch.append(queue.popleft())
            size += len(batch[-1][1])
        self.queued_bytes -= size - len(batch) * tun.VNET_SIZE
        return batch

    def _refused(self, exc: psycopg.Error) -> bool:
        """Disk full or quota: drop the batch (it was not logged), pause, retry.

        PostgreSQL rolls the failed insert back cleanly, so nothing logged is lost; what the
        agent must not do is queue packets that would be stale by the time there is room, or
        retry in a busy loop.
        """
        assert self.conn is not None
        reason = {DISK_FULL: "disk_full", QUOTA: "quota"}.get(exc.sqlstate or "")
        if reason is None or self.conn.closed:
            return False
        if not self.no_space.attempt:
            what = ("the database's disk is full" if reason == "disk_full"
                    else "this peer is over its daily log quota (pgvpn.limits)")
            log.error("sender: %s (%s): new packets are dropped and counted (reason %s) until "
                      "there is room; everything logged so far is intact", what,
                      db.describe(exc), reason)
        self.refused_for = reason
        self.no_space.failed()
        if reason == "disk_full":
            metrics.DB_DISK_FULL.set(1)
        metrics.DROPPED.labels(reason).inc(len(self.pending))
        self.pending = []
        return True

    def _queue_full(self, exc: psycopg.Error) -> bool:
        """The NOTIFY queue is full: a batch notified in its commit rolled back whole (send it
        again unnotified); a wake-up after the commit failed alone.

        Anyone may NOTIFY, and a listener that stops reading pins the cluster's queue until it
        fills (docs/security.md): delivery must not depend on it, so batches go without a
        wake-up for a while and receivers find them by polling.
        """
        assert self.conn is not None
        if exc.sqlstate != QUEUE_FULL or self.conn.closed or not self.notify:
            return False
        if time.monotonic() >= self.notify_again_at:
            log.warning("sender: the database's NOTIFY queue is full (%s); sending without "
                        "wake-ups for %.0fs, receivers poll", db.describe(exc), UNNOTIFIED_FOR)
        self.notify_again_at = time.monotonic() + UNNOTIFIED_FOR
        metrics.UNNOTIFIED.inc()
        return True

    def _send_rows(self, batch: list[Captured]) -> None:
        """Log a batch; tx_seq only advances once the commit is known to have happened."""
        assert self.conn is not None
        routes = self.routes
        ids = self.ids
        sealer = self.sealer
        next_seq = dict(self.tx_seq)
        counts: dict[int, list[int]] = {}
        r_dst: list[int] = []
        r_seq: list[int] = []
        r_sent: list[float] = []
        r_ver: list[int] = []
        r_src: list[bytes] = []
        r_dsta: list[bytes] = []
        r_proto: list[int] = []
        r_sport: list[int | None] = []
        r_dport: list[int | None] = []
        r_len: list[int] = []
        r_frag: list[bool] = []
        r_payload: list[bytes] = []
        r_offload: list[bytes | None] = []
        malformed = no_route = stale = 0
        if self.config.tun.join_bursts:
            batch, joined = bursts.join(batch)
            if joined:
                metrics.BURSTS_JOINED.inc(joined)
        vnet = tun.VNET_SIZE
        no_offload = tun.NO_OFFLOAD
        # Captured longer ago than max_age (an outage's queue): this host's clock against itself.
        oldest = time.time() - self.config.transport.max_age
        for sent_at, raw in batch:
            if sent_at < oldest:
                stale += 1
                continue
            packet = raw[vnet:]
            try:
                h = parse(packet)
            except MalformedPacket:
                malformed += 1
                continue
            peer = routes.lookup(h.dst_raw)
            if peer is None or (dst := ids.get(peer)) is None or dst not in next_seq:
                no_route += 1  # no peer owns it, or the operator has not registered it
                if peer is not None and peer in ids:
                    self.unlinked = True  # registered, but no link (removed, not yet back)
                continue
            seq = next_seq[dst] + 1
            next_seq[dst] = seq
            c = counts.get(dst)
            if c is None:
                counts[dst] = [1, h.length]
            else:
                c[0] += 1
                c[1] += h.length
            r_dst.append(dst)
            r_seq.append(seq)
            r_sent.append(sent_at)
            r_ver.append(h.version)
            if h.version == 4:
                r_src.append(wire.INET4 + packet[12:16])
                r_dsta.append(wire.INET4 + h.dst_raw)
            else:
                r_src.append(wire.INET6 + packet[8:24])
                r_dsta.append(wire.INET6 + h.dst_raw)
            r_proto.append(h.protocol)
            r_sport.append(h.src_port)
            r_dport.append(h.dst_port)
            r_len.append(h.length)
            r_frag.append(h.fragment)
            r_payload.append(packet if sealer is None else sealer.seal(peer, seq, packet))
            offload = raw[:vnet]
            r_offload.append(None if offload == no_offload else offload)
        if malformed:
            metrics.DROPPED.labels("malformed").inc(malformed)
        if no_route:
            metrics.DROPPED.labels("no_route").inc(no_route)
        if stale:
            metrics.DROPPED.labels("too_old").inc(stale)
        if self.replay and not self._replays({d: next_seq[d] for d in counts}):
            return
        if not r_dst:
            return
        links = sorted(counts)
        with self.delivered.carry() as cursors:
            carried = sorted(cursors)
            now = time.monotonic()
            wake = self.notify and now >= self.notify_again_at
            bulk = self.delivered.bulk_at
            in_commit = wakes_in_commit(self.wake, self.from_idle, now - self.sent_at,
                                        sum(c[1] for c in counts.values()),
                                        now - max(bulk.get(d, -inf) for d in links))
            params = (
                ids[self.config.peer],
                wake and in_commit,
                wire.fixed("int2", links),
                wire.fixed("int8", [self.tx_seq[d] + 1 for d in links]),
                wire.fixed("int8", [next_seq[d] for d in links]),
                wire.fixed("int2", r_dst),
                wire.fixed("int8", r_seq),
                wire.timestamps(r_sent),
                wire.fixed("int2", r_ver),
                wire.blobs("inet", r_src),
                wire.blobs("inet", r_dsta),
                wire.fixed("int2", r_proto),
                wire.nullable_int4(r_sport),
                wire.nullable_int4(r_dport),
                wire.fixed("int4", r_len),
                wire.booleans(r_frag),
                wire.blobs("bytea", r_payload),
                wire.blobs("bytea", r_offload),
                wire.fixed("int2", carried),
                wire.fixed("int8", [cursors[s] for s in carried]),
            )
            if faults.ARMED:
                faults.reached("sender.before_commit")
                if carried:
                    faults.reached("sender.carrying")
                faults.reached("sender.in_commit")
            # two batches in a row whose packets were waiting: in full flow (a stray packet
            # that came during a commit makes one)
            self.waited_batches = 0 if self.from_idle else self.waited_batches + 1
            if self.waited_batches >= 2:
                self.delivered.flow_at = time.monotonic()
            started = time.perf_counter()
            self.in_flight = {d: (self.tx_seq[d] + 1, next_seq[d]) for d in links}
            if wake and not in_commit:
                self._send_and_wake(params)
            else:
                self.conn.execute(SEND_BATCH, params, prepare=True)
            self.in_flight = {}
        self.sent_at = time.monotonic()
        if self.replay:
            self.replay = {}
            metrics.IN_DOUBT_REPLAYED.inc()
            log.info("sender: the batch in doubt is logged again with its own sequence numbers")
        if faults.ARMED:
            faults.reached("sender.after_commit")
        if carried:
            metrics.CURSOR_SAVES.labels("sender").inc()
        metrics.INSERT_SECONDS.observe(time.perf_counter() - started)
        self.from_idle = False
        names = self.names
        seen = self.highwater.seen
        for d in links:
            self.tx_seq[d] = next_seq[d]
            seen(names[d], next_seq[d])
        metrics.ROWS.inc(len(r_dst))
        self._count(counts, len(r_dst))

    def _send_and_wake(self, params: tuple[object, ...]) -> None:
        """send_batch(), then the receivers' wake-up in a transaction of its own (migration
        0013), both in one CALL of send_and_wake() (migration 0016): one round trip.

        An error after the procedure's commit leaves the batch logged: the wake-up failed
        alone (a full NOTIFY queue fails at the wake-up's commit). The links' sequence numbers
        tell the two apart, this sender being their only writer. A failed wake-up does not
        fail the batch: it costs the receivers at most one poll interval, and is counted.
        (psycopg's pipeline mode would have sent the two statements together, but hung the
        sender under load, waiting in sync() for results the server had sent.)
        """
        conn = self.conn
        assert conn is not None
        try:
            conn.execute(SEND_AND_WAKE, params[:1] + params[2:], prepare=True)
        except psycopg.Error as exc:
            if conn.closed or not self._batch_committed():
                raise
            if not self._queue_full(exc):
                metrics.UNNOTIFIED.inc()
                self._wake_failed(exc)
        metrics.WOKEN_AFTER_COMMIT.inc()

    def _batch_committed(self) -> bool:
        """Whether the batch in flight committed, after an error (reconnect.holds). If the
        links cannot be read, the connection is closed: the batch is in doubt, for the
        reconnect to settle."""
        assert self.conn is not None
        try:
            held = self._links(self.conn)
        except psycopg.Error:
            self.conn.close()
            return False
        return holds(held, self.in_flight)

    def _wake_failed(self, exc: psycopg.Error) -> None:
        self.wakes_failed += 1
        now = time.monotonic()
        if now - self.wake_warned_at >= WARN_EVERY:
            log.warning("sender: could not wake the receivers of %d logged batch(es) (%s); "
                        "they find them at their next poll", self.wakes_failed,
                        db.describe(exc))
            self.wake_warned_at = now
            self.wakes_failed = 0

    def _send_payloads(self, batch: list[Captured]) -> None:
        """Payload mode (payload.py): nothing is logged."""
        assert self.conn is not None
        channels, messages, counts = payload.encode(batch, self.routes, self.ids)
        if not channels:
            return
        started = time.perf_counter()
        payload.send(self.conn, channels, messages)
        metrics.INSERT_SECONDS.observe(time.perf_counter() - started)
        self._count(counts, len(channels))

    def _count(self, counts: dict[int, list[int]], rows: int) -> None:
        metrics.BATCHES.inc()
        metrics.BATCH_SIZE.observe(rows)
        now = time.time()
        for dst, (n, size) in counts.items():
            peer = self.names[dst]
            metrics.PACKETS.labels("tx", peer).inc(n)
            metrics.BYTES.labels("tx", peer).inc(size)
            metrics.LAST_PACKET.labels("tx", peer).set(now)
