"""The wake-up after the commit (schema v13): honest, and off the cluster's notification lock.

A peer's login may wake only the receivers of its own links, only up to what it committed;
the wake-up's commit does not wait for a WAL flush, which is the point of it; and a lab carries
traffic with either `transport.wake`, the receivers woken by notifications, not polls.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import sql

from pgvpn_agent.lab import Lab
from pgvpn_agent.labhost import role
from tests.integration.hostile import BAD_INPUT, COLUMNS, batch
from tests.integration.pump import Pump

pytestmark = pytest.mark.integration


def _as(lab: Lab, peer: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(lab.dsn(role(peer)), autocommit=True)


def _notifications(conn: psycopg.Connection[tuple[object, ...]]) -> list[tuple[str, str]]:
    return [(n.channel, n.payload) for n in conn.notifies(timeout=1.0)]


def test_a_peer_wakes_only_its_own_links_up_to_what_they_hold(make_lab):
    lab = make_lab(peers=3, agents=False)
    ids = {r.split("|")[0]: int(r.split("|")[1]) for r in
           lab.psql("SELECT name, id FROM pgvpn.peer").splitlines()}
    p1, p2, p3 = (ids[p.name] for p in lab.peers)
    lab.psql(f"UPDATE pgvpn.link SET tx_seq = 5 WHERE src = {p1} AND dst = {p2}")
    with _as(lab, lab.peers[1].name) as receiver, _as(lab, lab.peers[0].name) as sender, \
            _as(lab, lab.peers[2].name) as other:
        channel = str(receiver.execute("SELECT pgvpn.my_channel()").fetchone()[0])
        receiver.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        wake = "SELECT pgvpn.wake(%s::int2[], %s::int8[])"
        # past what the link holds: nobody is woken
        assert sender.execute(wake, ([p2], [6])).fetchone() == (0,)
        # p1's count is not p3's: its own link to p2 holds nothing; no link to itself; nothing
        # before the first row
        assert other.execute(wake, ([p2], [5])).fetchone() == (0,)
        assert sender.execute(wake, ([p1], [1])).fetchone() == (0,)
        assert sender.execute(wake, ([p2], [0])).fetchone() == (0,)
        assert _notifications(receiver) == []
        # its own link, up to what it committed: the receiver hears who and how far
        assert sender.execute(wake, ([p2, p3], [5, 0])).fetchone() == (1,)
        assert _notifications(receiver) == [(channel, f"{p1}:5")]
        # its commit does not wait for a WAL flush (it writes no row: only NOTIFY's own
        # commit record, which is flushed in the background), so the notification lock it
        # takes is held for microseconds
        with psycopg.connect(lab.dsn(), autocommit=True) as admin:
            syncs = "SELECT wal_sync FROM pg_stat_wal"
            before = int(admin.execute(syncs).fetchone()[0])
            for _ in range(100):
                sender.execute(wake, ([p2], [5]))
            flushed = int(admin.execute(syncs).fetchone()[0]) - before
        assert flushed < 10, f"{flushed} WAL flushes for 100 wake-ups"
        _notifications(receiver)
        # a role that is no peer is refused
        with psycopg.connect(lab.dsn(), autocommit=True) as admin:
            admin.execute("CREATE ROLE pgvpn_stranger LOGIN IN ROLE pgvpn_agent")
        with psycopg.connect(lab.dsn("pgvpn_stranger"), autocommit=True) as stranger, \
                pytest.raises(psycopg.errors.InsufficientPrivilege):
            stranger.execute(wake, ([p2], [5]))


@pytest.mark.parametrize("wake", ["after_commit", "in_commit", "auto"])
def test_receivers_are_woken_by_notifications(make_lab, wake):
    lab = make_lab(peers=2, transport={"wake": wake})
    a, b = lab.peers
    before = {p.name: lab.agent_metrics(p)["pgvpn_batches_woken_after_commit_total"]
              for p in (a, b)}
    assert lab.ping(a, b, count=20)
    for peer in (a, b):
        m = lab.agent_metrics(peer)
        # every ping and reply woke its receiver by a notification; polls are the idle ones
        assert m['pgvpn_receiver_wakeups_total{cause="notify"}'] >= 20, m
        assert m["pgvpn_unnotified_batches_total"] == 0, m
        after = m["pgvpn_batches_woken_after_commit_total"] - before[peer.name]
        # pings 0.2 s apart: "auto" notifies inside each idle sender's commit (the first
        # may follow the lab's own checks within QUIET)
        assert (after >= 20) if wake == "after_commit" else (after <= (wake == "auto")), \
            (wake, after)


def test_auto_wakes_after_the_commit_while_batches_follow_each_other(make_lab):
    """A TCP flow leaves the notification lock alone: its data sender's batches (packets
    waiting, or a big burst just after the batch before) and its ACK sender's, though that
    one waits for most of them (each delivered page's ACKs come after its previous batch),
    which the first version of "auto" notified inside their commits. Either way the flow's
    receivers are woken by notifications, not polls."""
    lab = make_lab(peers=2)
    a, b = lab.peers
    report = lab.iperf(a, b, seconds=3)
    assert report["end"]["sum_received"]["bytes"] > 0
    for peer in (a, b):
        m = lab.agent_metrics(peer)
        batches = m["pgvpn_insert_batches_total"]
        after = m["pgvpn_batches_woken_after_commit_total"]
        # (a 3 s flow here: 653 of 660 and 871 of 881)
        assert after > batches * 0.9, (peer.name, after, batches)
        assert m['pgvpn_receiver_wakeups_total{cause="notify"}'] > 50 * \
            max(1.0, m['pgvpn_receiver_wakeups_total{cause="poll"}']), m
        assert m["pgvpn_unnotified_batches_total"] == 0, m


SEND_AND_WAKE_ANY = ("CALL pgvpn.send_and_wake(" + ", ".join(
    f"%({name})s::{kind}" for name, kind in COLUMNS if name != "p_notify") + ")")


def test_send_and_wake_commits_the_batch_then_wakes_and_adds_no_power(make_lab):
    """The procedure of schema v16 runs as its caller: what it logs and whom it wakes are what
    send_batch() and wake() allow that login, and its COMMIT is refused inside a caller's
    transaction, so it cannot end one half-done."""
    lab = make_lab(peers=3, agents=False)
    ids = {r.split("|")[0]: int(r.split("|")[1]) for r in
           lab.psql("SELECT name, id FROM pgvpn.peer").splitlines()}
    p1, p2, p3 = (ids[p.name] for p in lab.peers)
    with _as(lab, lab.peers[1].name) as receiver, _as(lab, lab.peers[0].name) as sender, \
            _as(lab, lab.peers[2].name) as other:
        channel = str(receiver.execute("SELECT pgvpn.my_channel()").fetchone()[0])
        receiver.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

        def logged() -> int:
            return int(lab.psql(f"SELECT count(*) FROM pgvpn.packet WHERE dst_peer = {p2}"))

        # another peer's login cannot send as p1: refused before anything is committed
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            other.execute(SEND_AND_WAKE_ANY, batch(p1, [(p2, 1)]))
        # nor can a batch that send_batch() refuses wake anyone
        with pytest.raises(psycopg.Error) as refused:
            sender.execute(SEND_AND_WAKE_ANY, batch(p1, [(p2, 1)], links=[(p2, 1, 2)]))
        assert refused.value.sqlstate == BAD_INPUT
        # inside the caller's own transaction the procedure may not commit: all rolls back
        sender.autocommit = False
        with pytest.raises(psycopg.errors.InvalidTransactionTermination):
            sender.execute(SEND_AND_WAKE_ANY, batch(p1, [(p2, 1)]))
        sender.rollback()
        sender.autocommit = True
        assert logged() == 0
        assert _notifications(receiver) == []
        # an honest batch: logged, the link advanced, then its receiver woken with how far
        sender.execute(SEND_AND_WAKE_ANY, batch(p1, [(p2, 1), (p2, 2), (p3, 1)]))
        assert logged() == 2
        assert lab.psql(f"SELECT tx_seq FROM pgvpn.link WHERE src = {p1} AND dst = {p2}") == "2"
        assert _notifications(receiver) == [(channel, f"{p1}:2")]
        # the batch and the wake-up are two transactions: with wake() refused to this login,
        # the CALL fails after the batch's commit, which stays
        lab.psql("REVOKE EXECUTE ON FUNCTION pgvpn.wake(smallint[], bigint[]) FROM pgvpn_agent")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            sender.execute(SEND_AND_WAKE_ANY, batch(p1, [(p2, 3)]))
        assert logged() == 3
        assert lab.psql(f"SELECT tx_seq FROM pgvpn.link WHERE src = {p1} AND dst = {p2}") == "3"
        assert _notifications(receiver) == []


def test_a_wake_up_that_fails_after_the_commit_loses_nothing(make_lab):
    """send_and_wake() commits the batch before it wakes anyone. When the wake-up fails after
    that commit (here EXECUTE on wake() revoked; in production a full NOTIFY queue), the
    agent counts the batch as logged: neither sent again nor dropped, and its receiver finds
    it at its next poll. Numbered datagrams both ways, in order, each once."""
    lab = make_lab(peers=2, transport={"wake": "after_commit", "poll_interval": 0.2})
    a, b = lab.peers
    ab, ba = Pump(lab, a, b, port=7901, every=0.01), Pump(lab, b, a, port=7902, every=0.01)
    time.sleep(1.0)
    before = {p.name: lab.agent_metrics(p) for p in (a, b)}
    lab.psql("REVOKE EXECUTE ON FUNCTION pgvpn.wake(smallint[], bigint[]) FROM pgvpn_agent")
    revoked_at = time.monotonic()
    try:
        time.sleep(3.0)
    finally:
        lab.psql("GRANT EXECUTE ON FUNCTION pgvpn.wake(smallint[], bigint[]) TO pgvpn_agent")
    during = {p.name: lab.agent_metrics(p) for p in (a, b)}
    time.sleep(2.0)
    for logged, _, w in (ab.finish(), ba.finish()):
        assert w.repeats == 0 and not w.rewinds, "a datagram was delivered twice"
        assert w.delivered == len(logged) > 400, (w.delivered, len(logged))
    # the datagrams sent while the wake-ups failed arrived, found by the receivers' polls
    assert ab.first_arrival(revoked_at + 1.0) is not None
    for peer in (a, b):
        m, now = during[peer.name], lab.agent_metrics(peer)
        was = before[peer.name]
        assert m["pgvpn_unnotified_batches_total"] - was["pgvpn_unnotified_batches_total"] >= 20
        # the receivers found those batches by polling (0.2 s) while nothing woke them
        polls = 'pgvpn_receiver_wakeups_total{cause="poll"}'
        assert m[polls] - was[polls] >= 10, (was, m)
        # nothing was dropped or sent again, no connection lost
        assert now.get('pgvpn_packets_dropped_total{reason="db_error"}', 0) == 0, now
        for d in ("tx", "rx"):
            assert now.get(f'pgvpn_db_reconnects_total{{direction="{d}"}}', 0) == 0, now
        # and once wake() may run again, notifications wake the receivers again
        assert now['pgvpn_receiver_wakeups_total{cause="notify"}'] > \
            m['pgvpn_receiver_wakeups_total{cause="notify"}'] + 20, (m, now)
        assert now["pgvpn_unnotified_batches_total"] < m["pgvpn_unnotified_batches_total"] + 5
