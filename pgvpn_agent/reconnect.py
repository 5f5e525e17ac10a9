"""What the sender checks each time it connects, and how it lets a broken connection go.

Where each of its links stands in the database against what it saw committed (a lost commit
is skipped past, highwater.py), whether the batch in flight at a disconnect committed, was lost
or is in doubt after a failover (never sent twice, its numbers never used again), the server's
timeline, and links that the operator removed or that came back. Split from sender.py, whose
loop uses it as a base class.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import psycopg

from pgvpn_agent import db, metrics
from pgvpn_agent.config import Config
from pgvpn_agent.highwater import HighWater
from pgvpn_agent.payload import Captured
from pgvpn_agent.routing import RouteTable
from pgvpn_agent.schema import check_version

log = logging.getLogger(__name__)
# This sender's links as the database has them (it is their only writer).
LINKS = "SELECT dst, tx_seq FROM pgvpn.link WHERE src = %s"


def holds(links: dict[int, int], batch: dict[int, tuple[int, int]]) -> bool:
    """Whether `links` (dst -> tx_seq, read from the database) hold a batch (dst -> its first
    and last numbers) as committed: every link of it still there stands exactly at the batch's
    last number. This sender being their only writer, its own links tell, and only those: a
    link removed meanwhile tells nothing, and a peer that joined meanwhile has a link the batch
    never wrote (a batch judged by its first packet's peer was sent twice then)."""
    present = [(d, last) for d, (_, last) in batch.items() if d in links]
    return bool(present) and all(links[d] == last for d, last in present)


class LinkRecovery:
    """The sender's connection and link state (its attributes are set by Sender.__init__)."""

    config: Config
    routes: RouteTable
    conn: db.Conn | None
    backoff: db.Backoff
    queue: deque[Captured]
    pending: list[Captured]
    ids: dict[str, int]
    names: dict[int, str]
    tx_seq: dict[int, int]
    highwater: HighWater
    timeline: int | None
    in_flight: dict[int, tuple[int, int]]
    replay: dict[int, tuple[int, int]]
    links_read_at: float
    connected_once: bool

    def _connect(self) -> None:
        cfg = self.config
        try:
            conn = db.connect(cfg.database, f"pgvpn-{cfg.peer}-tx")
            try:
                check_version(conn)
                self.ids = db.peer_ids(conn, cfg.peer, [p.name for p in cfg.peers])
                self.names = {v: k for k, v in self.ids.items()}
                db.lock_peer(conn, db.LOCK_SENDER, cfg.peer)
                if cfg.mode == "trigger":
                    conn.execute("SET pgvpn.notify = 'trigger'")
                committed = self._links(conn)
                row = conn.execute("SELECT pgvpn.timeline()").fetchone()
                timeline = int(row[0]) if row else 0
                conn.add_notice_handler(self._notice)
            except BaseException:
                conn.close()
                raise
        except (psycopg.Error, RuntimeError) as exc:
            delay = self.backoff.failed()
            log.warning("sender: database unavailable (%s); retrying in %.1fs",
                        db.describe(exc), delay)
            return
        promoted = self.timeline is not None and timeline != self.timeline
        if promoted:
            log.warning("sender: the database is on timeline %d, it was on %d: a failover or a "
                        "switchover happened", timeline, self.timeline)
            metrics.TIMELINE_CHANGES.inc()
        in_doubt: dict[int, tuple[int, int]] = {}
        if self.pending and cfg.mode != "payload":
            # the batch whose commit the sender never heard back about
            if holds(committed, self.in_flight):
                log.info("sender: the batch in flight at the disconnect was committed")
                self.pending = []
                self.replay = {}
            elif promoted and self.in_flight:
                in_doubt = self.in_flight
                metrics.IN_DOUBT.labels("in_flight").inc()
        self.in_flight = {}
        try:
            self._catch_up(conn, committed)
            self._replay_or_skip(conn, committed, in_doubt or self.replay)
        except psycopg.Error as exc:
            conn.close()
            delay = self.backoff.failed()
            log.warning("sender: database error (%s); retrying in %.1fs", db.describe(exc), delay)
            return
        # What the database shows now may have been read by a receiver, even if no commit of
        # it was confirmed to this sender (committed on a primary whose synchronous standby
        # never had it): those numbers are never used again either.
        for dst, seq in committed.items():
            self.highwater.seen(self.names[dst], seq)
        self.tx_seq = committed
        self.conn = conn
        self.timeline = timeline
        metrics.TIMELINE.set(timeline)
        if self.connected_once:
            metrics.RECONNECTS.labels("tx").inc()
            log.info("sender: database connection restored (%d packets queued)", len(self.queue))
        else:
            log.info("sender: connected, mode %s, batch_max %d", cfg.mode, cfg.transport.batch_max)
        self.connected_once = True
        self.backoff.succeeded()
        metrics.DB_UP.labels("tx").set(1)

    def _catch_up(self, conn: db.Conn, committed: dict[int, int]) -> None:
        """The database lost commits this sender saw (highwater.py): move its links past them."""
        names = self.names
        behind = self.highwater.behind({names[d]: s for d, s in committed.items()})
        for peer, mark in behind.items():
            dst = self.ids[peer]
            if self.replay.get(dst) == (committed[dst] + 1, mark):
                continue  # the batch in doubt, to be sent again with these very numbers
            log.error("sender: the database lost committed packets on the link to %s: its "
                      "sequence is at %d, this sender saw %d committed (a restore, a failover "
                      "to a standby that missed them, or asynchronous commits); continuing "
                      "after %d, receivers will count the hole", peer, committed[dst], mark, mark)
            metrics.SEQUENCE_REGRESSIONS.labels(peer).inc()
            conn.execute("SELECT pgvpn.advance_link(%s::int2, %s)", (dst, mark))
            committed[dst] = mark

    def _links(self, conn: db.Conn) -> dict[int, int]:
        """This sender's links as the database has them now, dst -> tx_seq (one writer: the
        values are its). Links to peers this config does not list are not its to write."""
        rows = conn.execute(LINKS, (self.ids[self.config.peer],))
        return {int(d): int(s) for d, s in rows if int(d) in self.names}

    def _read_links(self) -> None:
        """tx_seq as the database has it now, and when it was read."""
        assert self.conn is not None
        self.tx_seq = self._links(self.conn)
        self.links_read_at = time.monotonic()

    def _relinked(self, exc: psycopg.Error) -> bool:
        """A link's sequence was not where this sender left it (PV001): reload the links.

        A link that is gone (its peer removed by the operator) sends the batch again at once
        without it, that peer's packets counted as no_route; one that moved (a second agent
        with this peer name) drops the batch as an error, as before.
        """
        assert self.conn is not None
        if exc.sqlstate != "PV001" or self.conn.closed:
            return False
        before = self.tx_seq
        try:
            self._read_links()
        except psycopg.Error:
            return False  # the connection went with it (this peer removed): _lost() decides
        gone = sorted(self.names[d] for d in set(before) - set(self.tx_seq))
        if not gone:
            return False
        log.warning("sender: the links to %s are gone (removed by the operator); their packets "
                    "are dropped as no_route, the batch is sent again without them",
                    ", ".join(gone))
        return True

    def _replay_or_skip(self, conn: db.Conn, committed: dict[int, int],
                        in_doubt: dict[int, tuple[int, int]]) -> None:
        """A batch lost with the connection, absent from a newly promoted primary.

        It may have committed on the old primary and been read there (a commit is visible
        before the synchronous standby confirms it). Sent again with the very sequence numbers
        it had, it is delivered exactly once: a receiver that read it on the old primary has
        its cursor past those numbers and skips it, the others read it. That holds only if
        each link continues right before its first number (the new primary has everything
        up to it) and the batch keeps every packet (send_rows checks: none too old, no link
        gone); otherwise it is dropped (counted as in_doubt) and its numbers are never used
        again: the links move past them (pgvpn.link_advance; receivers count the hole).
        """
        if not in_doubt:
            return
        if self.pending and all(committed.get(d) == first - 1
                                for d, (first, _) in in_doubt.items()):
            if self.replay != in_doubt:
                log.warning("sender: the batch in flight at the failover (%d packets) is not on "
                            "the new primary; it is sent again with the same sequence numbers, "
                            "so a receiver that read it on the old primary skips it",
                            len(self.pending))
                self.replay = in_doubt
                for d, (_, last) in in_doubt.items():
                    self.highwater.seen(self.names[d], last)  # a crash now: skipped, not reused
                self.highwater.flush(force=True)
            return
        self._skip_replay(conn, committed, in_doubt)

    def _skip_replay(self, conn: db.Conn, committed: dict[int, int],
                     in_doubt: dict[int, tuple[int, int]]) -> None:
        """Drop the batch in doubt and move its links past its numbers."""
        log.error("sender: the batch in flight at the failover (%d packets) cannot be sent "
                  "again with its own sequence numbers and may have been read on the old "
                  "primary: dropped, and its numbers are not used again", len(self.pending))
        metrics.DROPPED.labels("in_doubt").inc(len(self.pending))
        self.pending = []
        for dst, (_, last) in in_doubt.items():
            if dst in committed and committed[dst] < last:
                conn.execute("SELECT pgvpn.advance_link(%s::int2, %s)", (dst, last))
                committed[dst] = last
                self.highwater.seen(self.names[dst], last)
        self.replay = {}  # only once every link is past it: a failure above tries again

    def _replays(self, numbers: dict[int, int]) -> bool:
        """The batch about to be sent ends each link where the batch in doubt ended (with the
        same first numbers: tx_seq is where it was), so it is that batch, whole; if not, it
        is dropped and those numbers skipped. False: do not send it."""
        if not self.replay or numbers == {d: last for d, (_, last) in self.replay.items()}:
            return True
        assert self.conn is not None
        self._skip_replay(self.conn, self.tx_seq, self.replay)
        return False

    def _notice(self, diag: psycopg.errors.Diagnostic) -> None:
        """The server cancelled a commit's wait for its synchronous standby (a statement
        timeout, an operator): committed here, perhaps not on the standby. Sequence numbers
        are kept as seen (highwater), so a failover to that standby is caught at the reconnect."""
        if "might not have been replicated" in (diag.message_detail or ""):
            log.error("sender: the database committed a batch without its synchronous standby's "
                      "confirmation (%s): a failover now would lose it", diag.message_primary)
            metrics.IN_DOUBT.labels("warned").inc()

    def _lost(self, exc: psycopg.Error) -> bool:
        """Drop a broken connection (True); errors on a live one are the caller's (False)."""
        assert self.conn is not None
        if not self.conn.closed and not isinstance(exc, psycopg.OperationalError):
            return False
        delay = self.backoff.failed()
        log.warning("sender: database error (%s); %d packets queued, reconnecting in %.1fs",
                    db.describe(exc), len(self.queue) + len(self.pending), delay)
        metrics.DB_UP.labels("tx").set(0)
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        return True
