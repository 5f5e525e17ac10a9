"""Database -> TUN: wake on NOTIFY (or a poll), fetch every new row for this peer, deliver in order.

The cursor of each incoming link (rx_seq) is committed within transport.save_delay of the
packets being written, by the sender's next batch or else by the receiver itself
(delivered.py), so an agent restart resumes where it stopped; a lost notification costs at most
one poll interval of latency, never a packet.
"""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import sql

from pgvpn_agent import carried, carrybox, db, faults, metrics, seal, tun, wire
from pgvpn_agent.config import Config
from pgvpn_agent.delivered import BULK, Delivered
from pgvpn_agent.highwater import ExitCursors
from pgvpn_agent.pagecount import PageCount
from pgvpn_agent.payload import deliver as deliver_payloads
from pgvpn_agent.schema import check_version
from pgvpn_agent.stopping import Stop, notifications

log = logging.getLogger(__name__)
# src, seq, age by the database clock (s), payload, offload header: a row as fetched
Row = tuple[int, int, float, bytes | None, bytes | None]

FETCH = """
SELECT p.src_peer, p.seq, extract(epoch FROM statement_timestamp() - p.logged_at)::float8,
       CASE WHEN p.logged_at >= statement_timestamp() - make_interval(secs => %b)
            THEN p.payload END, p.offload
FROM unnest(%b::smallint[], %b::bigint[]) AS c (src, last)
CROSS JOIN LATERAL (
    SELECT src_peer, seq, logged_at, payload, offload FROM pgvpn.packet
    WHERE dst_peer = %b AND src_peer = c.src AND seq > c.last
    ORDER BY seq LIMIT %b
) AS p
"""
SAVE_CURSORS = """
UPDATE pgvpn.cursor l SET rx_seq = v.last, rx_at = statement_timestamp()
FROM unnest(%b::smallint[], %b::bigint[]) AS v (src, last)
WHERE l.dst = %b AND l.src = v.src AND l.rx_seq < v.last
"""
# Per incoming link: packets logged but not delivered, and the age of the oldest of them by the
# database clock (one index probe per partition, only for links that lag).
LAG = """
SELECT l.src, greatest(l.tx_seq - c.rx, 0),
       coalesce(extract(epoch FROM statement_timestamp() - p.logged_at)::float8, 0)
FROM unnest(%s::smallint[], %s::bigint[]) AS c (src, rx)
JOIN pgvpn.link l ON l.src = c.src AND l.dst = %s
LEFT JOIN LATERAL (
    SELECT logged_at FROM pgvpn.packet
    WHERE dst_peer = l.dst AND src_peer = l.src AND seq = c.rx + 1 LIMIT 1
) AS p ON l.tx_seq > c.rx
"""
LAG_EVERY = 2.0
# How often the receiver polls while its cursors wait for a sender's transaction in flight.
STALLED_POLL = 0.05
# A page of rows is bounded in bytes as well as rows (transport.fetch_max): with TUN offload a
# row can hold 64 KB, and a page is held about three times over while it is delivered.
PAGE_BYTES = 2 << 20
# Carried rows are taken only when this agent's sender has not been in full flow for this long
# (delivered.Delivered.flow_at): one bulk flow measured 10 % slower when its ACKs came carried
# (the sender's batches 5-30 % more per MB); an idle ping, a keystroke still ride.
FLOW_WINDOW = 0.05


class Receiver:
    def __init__(self, config: Config, tun: tun.Tun, stop: Stop,
                 delivered: Delivered | None = None) -> None:
        self.config = config
        self.delivered = delivered if delivered is not None else Delivered()
        self.save_delay = config.transport.save_delay
        self.tun = tun
        self.stop = stop
        self.conn: db.Conn | None = None
        self.backoff = db.Backoff()
        self.me = 0
        self.names: dict[int, str] = {}
        self.cursor: dict[int, int] = {}
        self.exit_cursors = ExitCursors(config.transport.state_file)
        self.connected_once = False
        self.fresh = False
        self.channel = "pgvpn_" + config.peer
        self.sealer = seal.for_config(config)
        self.lag_at = 0.0
        self.row_bytes = 1500.0  # running mean of fetched payload sizes, for the page limit
        # Inbound AllowedIPs: a row's packet must come from an address its sender owns.
        self.sources = config.source_filter()
        # The texts of the notifications that woke this receiver, until read (carried.py).
        self.notes: list[str] = []
        # Unsealed pairs: each incoming link's carry key (carrybox.py), read at connect and
        # again, at most once a poll interval, after a box did not open (a key made anew).
        self.carry_keys: dict[int, bytes] = {}
        self.timeline = 0  # the server's, with the keys: a box names the one it was made on
        self.keys_read_at = 0.0
        self.fetched_all_at = 0.0  # time.monotonic() of the last fetch of every link

    def run(self) -> None:
        wait = min(self.config.transport.poll_interval, 1.0)
        try:
            while not self.stop.is_set():
                if self.conn is None:
                    if self.backoff.due():
                        self._connect()
                    if self.conn is None:
                        self.stop.wait(min(wait, self.backoff.wait_time()))
                        continue
                try:
                    if self.fresh:
                        # Just (re)connected: rows committed while no LISTEN was up (a restart,
                        # a failover) are fetched now, not at the next poll.
                        self.fresh = False
                        if self.config.mode != "payload":
                            self._fetch_all()
                    if self.config.mode == "payload":
                        deliver_payloads(self.conn, self.tun, wait,
                                         self.config.transport.max_age, self.stop)
                        continue
                    due = self._save_due()
                    if due is not None and due <= 0 and self.delivered.in_flight():
                        # A batch of the sender carries earlier cursors and has not committed
                        # (a slow commit, a lock wait): the save waits for it, delivery does not
                        # (what a wake-up carried or named; every link once a poll interval).
                        if self._wait(min(wait, STALLED_POLL)):
                            self._woken()
                        elif (time.monotonic() - self.fetched_all_at
                              >= self.config.transport.poll_interval):
                            self._fetch_all()
                    elif due is None or due >= wait:
                        if self._wait(wait):
                            self._woken()
                        else:
                            self._fetch_all()
                    elif due > 0 and self._wait(due, poll=False):
                        self._woken()
                    self._save_overdue()
                    self._sample_lag()
                except psycopg.Error as exc:
                    self._lost(exc)
        finally:
            saved = False
            if self.conn is not None:
                saved = self._save_on_exit()
                self.conn.close()
            if not saved and self.cursor and self.exit_cursors.save(
                    {self.names[s]: c for s, c in self.cursor.items() if s in self.names}):
                log.warning("receiver: stopping without the database: the cursors of what was "
                            "delivered are kept in %s for the next start",
                            self.exit_cursors.path)
            metrics.DB_UP.labels("rx").set(0)

    def _wait(self, timeout: float, poll: bool = True) -> bool:
        """Block until a notification arrives or the timeout passes; True if one arrived."""
        assert self.conn is not None
        notes = notifications(self.conn, timeout, self.stop)
        self.notes.extend(note.payload for note in notes)
        woke = bool(notes)
        if woke or poll:
            metrics.WAKEUPS.labels("notify" if woke else "poll").inc()
        return woke

    def _save_due(self) -> float | None:
        """Seconds until delivered cursors must be committed by the receiver; None: none wait."""
        oldest = self.delivered.oldest()
        return None if oldest is None else oldest + self.save_delay - time.monotonic()

    def _save_overdue(self) -> None:
        """Commit the cursors no batch of the sender carried within save_delay."""
        due = self._save_due()
        if due is not None and due <= 0:
            self._save()

    def _save(self) -> None:
        """Commit the delivered cursors, unless a batch of the sender carries them right now."""
        assert self.conn is not None
        with self.delivered.carry() as cursors:
            if not cursors:
                return
            links = sorted(cursors)
            self.conn.execute(SAVE_CURSORS, (links, [cursors[s] for s in links], self.me),
                              prepare=True)
        metrics.CURSOR_SAVES.labels("receiver").inc()

    def _save_on_exit(self) -> bool:
        """Stopping: what was written to the TUN is committed before the connection closes."""
        self.delivered.settle(timeout=2.0)
        try:
            self._save()
        except psycopg.Error as exc:
            log.warning("receiver: could not save the cursors at exit (%s)", db.describe(exc))
            return False
        return True

    def _woken(self) -> None:
        """Deliver what the notifications carried; else fetch the links they name."""
        notes = self.notes
        if not self._carried():
            self._fetch_all(carried.links(notes))
        elif time.monotonic() - self.fetched_all_at >= self.config.transport.poll_interval:
            self._fetch_all()  # carried rows do not replace the look at every link

    def _fetch_all(self, only: set[int] | None = None) -> None:
        """Fetch and deliver until no link has a full page waiting: every incoming link, or
        `only` those a notification named — but every link at least once a poll interval, so
        that a lost notification is found while other links keep the receiver awake. (Each
        link is an index probe per day partition: with many peers, reading them all on every
        wake-up was most of a fetch.)"""
        assert self.conn is not None
        self.notes.clear()  # the table holds whatever they carried
        fetch_max = self.config.transport.fetch_max
        now = time.monotonic()
        if only is None or now - self.fetched_all_at >= self.config.transport.poll_interval:
            links = sorted(self.cursor)
            self.fetched_all_at = now
        else:
            links = sorted(only.intersection(self.cursor))
            if not links:
                return
        while not self.stop.is_set():
            limit = max(1, min(fetch_max, int(PAGE_BYTES / self.row_bytes)))
            started = time.perf_counter()
            cur = self.conn.cursor(binary=True)
            cur.execute(FETCH, (self.config.transport.max_age, wire.fixed("int2", links),
                                wire.fixed("int8", [self.cursor[s] for s in links]), self.me,
                                limit), prepare=True)
            rows = cur.fetchall()
            metrics.FETCH_SECONDS.observe(time.perf_counter() - started)
            if not rows:
                return
            self.row_bytes = 0.8 * self.row_bytes + 0.2 * (
                sum(len(r[3] or b"") for r in rows) / len(rows))
            self._deliver(rows, started)
            if len(rows) < limit:
                return
            self._sample_lag()  # still behind: the backlog between two pages is the lag

    def _carried(self) -> bool:
        """Deliver the rows the notifications carried (carried.py); False: read the table.

        Every carried payload must open with the pair's key for its link and sequence number
        before any is written: a text someone else NOTIFYed on this channel, or one this peer
        cannot open, moves no cursor; the fetch that follows reads the log instead.
        """
        notes, self.notes = self.notes, []
        sealer = self.sealer
        # (an unsealed pair's wake-ups without a box are parsed once, by carried.links())
        if (not notes or time.monotonic() - self.delivered.flow_at < FLOW_WINDOW
                or (sealer is None and not any(";" in n for n in notes))):
            return False
        found = carried.pending(notes, self.cursor, None if sealer is not None else self._unbox)
        if found is None:
            return False
        rows: list[Row] = []
        for src, seq, (payload, offload) in found:
            name = self.names.get(src)
            if name is None:
                return False
            if sealer is not None:
                try:
                    payload = sealer.open(name, seq, payload)
                except seal.Unsealable:
                    metrics.CARRIED_REFUSED.inc()
                    return False
            rows.append((src, seq, 0.0, payload, offload))
        if rows:
            self._deliver(rows, time.perf_counter(), opened=True)
            metrics.CARRIED.inc(len(rows))
        return True

    def _unbox(self, note: carried.Note) -> tuple[carried.Carried, ...] | None:
        """The rows of a note's box, opened with its link's carry key; None: read the table."""
        assert note.box is not None
        key = self.carry_keys.get(note.src)
        rows = None if key is None else carrybox.open_box(key, note.src, note.last, self.me,
                                                           self.timeline, note.box)
        if rows is None:
            metrics.CARRIED_REFUSED.inc()
            if (self.conn is not None and time.monotonic() - self.keys_read_at
                    >= self.config.transport.poll_interval):
                self._read_keys(self.conn)
        return rows

    def _read_keys(self, conn: db.Conn) -> None:
        """The carry keys of this peer's incoming links (row-level security: its own only), and
        the server's timeline (a failover moves it; the receiver reconnects then)."""
        self.keys_read_at = time.monotonic()
        if self.sealer is None and self.config.mode == "logged":
            self.carry_keys = {int(s): bytes(k) for s, k in conn.execute(
                "SELECT src, key FROM pgvpn.carry_key WHERE dst = %s", (self.me,)).fetchall()}
            row = conn.execute("SELECT pgvpn.timeline()").fetchone()
            self.timeline = int(row[0]) if row else 0

    def _deliver(self, rows: list[Row], started: float, opened: bool = False) -> None:
        """Write a page of rows (grouped by link, in sequence order) to the TUN, then move the
        cursors past them; `opened`: the payloads are unsealed already (carried rows, whose
        age is not known here: they count into no latency histogram)."""
        if faults.ARMED:
            faults.reached("receiver.before_write")
        max_age = self.config.transport.max_age
        write = self.tun.write
        sealer = None if opened else self.sealer
        names = self.names
        check_source = self.sources.check
        # Ages come from the database's clock (now minus logged_at, both its own): no two
        # hosts' clocks are ever compared, so a peer whose clock is off delivers as well.
        fetched = time.perf_counter()
        waited = fetched - started
        last: dict[int, int] = {}
        per_link: dict[int, list[int]] = {}
        delivered: list[float] = []
        stale = refused = unsealable = forged = malformed = 0
        bad: dict[int, int] = {}  # sender id: packets from a source the sender does not own
        gaps: dict[int, int] = {}  # sender id: sequence numbers missing from the log
        repeated: dict[int, int] = {}  # sender id: rows whose number came already
        cursor = self.cursor
        sender = -1
        name: str | None = None
        for src, seq, age, payload, offload in rows:
            expected = last.get(src, cursor[src]) + 1
            if seq < expected:
                # A number the log holds twice (send_batch() never writes one: only the
                # owner's own INSERT, or a restore into a live log, can): delivered once.
                repeated[src] = repeated.get(src, 0) + 1
                continue
            if seq != expected:
                gaps[src] = gaps.get(src, 0) + seq - expected
            last[src] = seq
            if age > max_age or payload is None:  # the fetch leaves a stale row's payload out
                stale += 1
                continue
            if src != sender:  # rows come grouped by link: one name lookup per link
                sender, name = src, names.get(src)
            if name is None:  # a sender this config does not know owns no address
                bad[src] = bad.get(src, 0) + 1
                continue
            if sealer is not None:
                try:
                    payload = sealer.open(name, seq, payload)
                except seal.Unsealable as exc:
                    unsealable += 1
                    log.warning("receiver: dropped a stored packet: %s", exc)
                    continue
            # The source address of the packet as written, checked like WireGuard's
            # AllowedIPs; the RouteTable behind it caches each source's owner.
            reason = check_source(name, payload)
            if reason is not None:
                if reason == "malformed":
                    malformed += 1
                else:
                    bad[src] = bad.get(src, 0) + 1
                continue
            if offload is None:
                offload = tun.NO_OFFLOAD
            elif not tun.check_offload(offload, payload, payload[0] >> 4):
                forged += 1
                continue
            if not write(payload, offload):
                refused += 1
                continue
            delivered.append(age)
            c = per_link.get(src)
            if c is None:
                per_link[src] = [1, len(payload)]
            else:
                c[0] += 1
                c[1] += len(payload)
        done = time.time()
        late = time.perf_counter() - fetched + waited
        if faults.ARMED:
            faults.reached("receiver.after_write")
        # What reached the TUN is delivered, whether or not the save gets through.
        self.cursor.update(last)
        self.delivered.post(last)
        for src, (_, size) in per_link.items():
            if size >= BULK:  # the sender's next batches to src: that flow's ACKs
                self.delivered.bulk_at[src] = time.monotonic()
        self._save_overdue()  # at once with save_delay = 0
        PageCount(stale, refused, unsealable, forged, malformed, bad, gaps, repeated,
                  per_link).report(names, last, done)
        if not opened:
            metrics.DELIVERY_SECONDS.observe_batch([age + late for age in delivered])

    def _sample_lag(self) -> None:
        """Every incoming link's backlog after a fetch: one small query every LAG_EVERY s."""
        assert self.conn is not None
        if time.monotonic() < self.lag_at:
            return
        self.lag_at = time.monotonic() + LAG_EVERY
        links = sorted(self.cursor)
        rows = self.conn.execute(LAG, (links, [self.cursor[s] for s in links], self.me),
                                 prepare=True)
        for src, packets, seconds in rows:
            metrics.LAG_PACKETS.labels(self.names[src]).set(packets)
            metrics.LAG_SECONDS.labels(self.names[src]).set(seconds)

    def _connect(self) -> None:
        cfg = self.config
        try:
            # Cursor commits need not wait for the WAL flush: the live process keeps its own
            # cursor across database restarts, so a flush lost in a database crash could only
            # duplicate packets if the agent crashed within the same fraction of a second.
            conn = db.connect(cfg.database, f"pgvpn-{cfg.peer}-rx", synchronous_commit=False)
            try:
                check_version(conn)
                ids = db.peer_ids(conn, cfg.peer, [p.name for p in cfg.peers])
                self.me = ids[cfg.peer]
                db.lock_peer(conn, db.LOCK_RECEIVER, cfg.peer)
                if cfg.mode != "payload":
                    # A secret name only this peer learns: no other login can LISTEN to it.
                    row = conn.execute("SELECT pgvpn.my_channel()").fetchone()
                    self.channel = str(row[0]) if row and row[0] else self.channel
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                rows = conn.execute("SELECT c.src, c.rx_seq, l.tx_seq FROM pgvpn.cursor c "
                                    "JOIN pgvpn.link l ON l.src = c.src AND l.dst = c.dst "
                                    "WHERE c.dst = %s", (self.me,)).fetchall()
                # Links from peers this agent's config does not list (another site's peer, one
                # being added or removed) are not followed: their rows stay in the log.
                known = set(ids.values())
                saved = {int(s): int(r) for s, r, _ in rows if int(s) in known}
                sequences = {int(s): int(t) for s, _, t in rows}
                # What the last run delivered but could not commit as it stopped.
                loaded = self.exit_cursors.load()
                kept = {ids[n]: c for n, c in loaded.items() if n in ids and ids[n] in saved}
                for s, c in kept.items():
                    self.cursor[s] = max(c, self.cursor.get(s, 0))
                # Cursor saves lost with the old connection: write them again, so that a
                # restart after this reconnect does not deliver those packets twice.
                ahead = {s: c for s, c in self.cursor.items() if c > saved.get(s, 0)}
                if ahead:
                    conn.execute(SAVE_CURSORS, (list(ahead), list(ahead.values()), self.me))
                self._read_keys(conn)
            except BaseException:
                conn.close()
                raise
        except (psycopg.Error, RuntimeError) as exc:
            delay = self.backoff.failed()
            log.warning("receiver: database unavailable (%s); retrying in %.1fs",
                        db.describe(exc), delay)
            return
        self.names = {v: k for k, v in ids.items()}
        # Never move a cursor backwards: a cursor update lost with the connection must not
        # make this process deliver the same packets twice.
        self.cursor = {src: max(seq, self.cursor.get(src, 0)) for src, seq in saved.items()}
        for src, last in self.cursor.items():
            if sequences.get(src, last) < last:
                # The database lost rows this receiver delivered (a failover, a restore): their
                # sender moves the link past them when it reconnects (highwater.py).
                log.warning("receiver: the link from %s is at %d in the database, behind the %d "
                            "this receiver delivered: the database lost rows; waiting for its "
                            "sender to send them again or continue after them", self.names[src],
                            sequences[src], last)
                metrics.DELIVERED_AHEAD.labels(self.names[src]).inc()
        self.fresh = True
        self.conn = conn
        if loaded:
            self.exit_cursors.clear()
            log.info("receiver: committed the cursors the last run kept at its stop")
        if self.connected_once:
            metrics.RECONNECTS.labels("rx").inc()
            log.info("receiver: database connection restored")
        else:
            log.info("receiver: listening for wake-ups (channel %s…)", self.channel[:10])
        self.connected_once = True
        self.backoff.succeeded()
        metrics.DB_UP.labels("rx").set(1)

    def _lost(self, exc: psycopg.Error) -> None:
        delay = self.backoff.failed()
        log.warning("receiver: database error (%s); reconnecting in %.1fs",
                    db.describe(exc), delay)
        metrics.DB_UP.labels("rx").set(0)
        if self.conn is not None:
            self.conn.close()
        self.conn = None
