"""A batch in doubt after a failover: sent again with its own numbers, or dropped and skipped.

The end-to-end proof is tests/integration/test_failover.py (a real standby promoted, receivers
that read the batch on the old primary); here the decisions alone, against a connection that
records what the sender asks of the database.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from pgvpn_agent import config, metrics
from pgvpn_agent.sender import Sender
from pgvpn_agent.stopping import Stop
from tests.unit.test_config import BASE


class Conn:
    closed = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def execute(self, query: str, params: Any = None, **_: Any) -> None:
        self.calls.append((query, params))


B = 2  # peer b's id: the one link of these batches
IN_DOUBT = {B: (11, 13)}  # the batch in flight at the failover: numbers 11..13 to b


def sender() -> tuple[Sender, Conn]:
    s = Sender(config.parse(copy.deepcopy(BASE)), tun=Any, stop=Stop())  # type: ignore[arg-type]
    conn = Conn()
    s.conn = conn  # type: ignore[assignment]
    s.ids, s.names = {"a": 1, "b": B}, {1: "a", B: "b"}
    s.pending = [(time.time(), b"\0" * 60)] * 3
    return s, conn


def test_sent_again_when_the_new_primary_has_everything_before_it() -> None:
    s, conn = sender()
    s._replay_or_skip(conn, {B: 10}, IN_DOUBT)  # type: ignore[arg-type]
    assert s.replay == IN_DOUBT and len(s.pending) == 3
    assert conn.calls == [], "no link moves"
    assert s.highwater.behind({"b": 10}) == {"b": 13}, "a crash before it commits skips them"
    # the same batch numbered again ends where it ended: it goes
    s.tx_seq = {B: 10}
    assert s._replays({B: 13})


def test_dropped_and_skipped_when_an_earlier_commit_is_missing_too() -> None:
    s, conn = sender()
    before = metrics.DROPPED.labels("in_doubt")._value.get()
    committed = {B: 8}
    s._replay_or_skip(conn, committed, IN_DOUBT)  # type: ignore[arg-type]
    assert s.replay == {} and s.pending == []
    assert metrics.DROPPED.labels("in_doubt")._value.get() == before + 3
    assert [p for _, p in conn.calls] == [(B, 13)] and committed == {B: 13}


def test_a_batch_that_lost_a_packet_is_not_sent_with_those_numbers() -> None:
    """One packet too old by now (or a link gone): numbered again it would end at 12, and 11..12
    would name other packets than the ones a receiver may have read as 11..13."""
    s, conn = sender()
    s._replay_or_skip(conn, {B: 10}, IN_DOUBT)  # type: ignore[arg-type]
    s.tx_seq = {B: 10}
    assert not s._replays({B: 12})
    assert s.replay == {} and s.pending == [] and s.tx_seq == {B: 13}
    assert [p for _, p in conn.calls] == [(B, 13)]


def test_no_batch_left_to_send_again_skips_its_numbers_at_the_next_connect() -> None:
    """Refused (disk full) or failed while in doubt: the numbers must not name new packets."""
    s, conn = sender()
    s.pending = []
    s.replay = dict(IN_DOUBT)
    s._replay_or_skip(conn, {B: 10}, s.replay)  # type: ignore[arg-type]
    assert s.replay == {} and [p for _, p in conn.calls] == [(B, 13)]


def test_a_batch_is_judged_committed_by_the_links_it_wrote_alone() -> None:
    """reconnect.holds: the links as read after a lost connection against the batch in flight
    (dst -> first, last)."""
    from pgvpn_agent.reconnect import holds

    batch = {2: (11, 13), 3: (5, 5)}
    assert holds({2: 13, 3: 5}, batch)
    assert not holds({2: 10, 3: 4}, batch)  # rolled back: each link where the batch began
    assert holds({2: 13, 3: 5, 4: 0}, batch)  # a peer joined meanwhile: its link tells nothing
    assert holds({3: 5}, batch)  # a link removed meanwhile tells nothing either
    assert not holds({4: 0}, batch)  # none of its links left: nothing says it committed
    assert not holds({2: 13, 3: 5}, {})  # no statement was in flight
    # a link where no batch of this sender left it (another agent with this name moved it)
    assert not holds({2: 20, 3: 5}, batch)
