"""The wake-up after the commit (schema v13): honest, and off the cluster's notification lock.

A peer's login may wake only the receivers of its own links, only up to what it committed;
the wake-up's commit does not wait for a WAL flush, which is the point of it; and a lab carries
traffic with either `transport.wake`, the receivers woken by notifications, not polls.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from pgvpn_agent.lab import Lab
from pgvpn_agent.labhost import role

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
        # pings a second apart: "auto" notifies inside each idle sender's commit
        assert (after >= 20) if wake == "after_commit" else (after == 0), (wake, after)


def test_auto_wakes_after_the_commit_while_batches_follow_each_other(make_lab):
    """A TCP flow keeps its data sender busy: most of its batches leave the notification lock
    alone. The ACK sender waits for about half of its batches (each delivered page's ACKs
    arrive after its previous batch), so it uses both paths. Either way the flow's receivers
    are woken by notifications, not polls."""
    lab = make_lab(peers=2)
    a, b = lab.peers
    report = lab.iperf(a, b, seconds=3)
    assert report["end"]["sum_received"]["bytes"] > 0
    for peer in (a, b):
        m = lab.agent_metrics(peer)
        batches = m["pgvpn_insert_batches_total"]
        after = m["pgvpn_batches_woken_after_commit_total"]
        share = 0.5 if peer is a else 0.2
        assert after > batches * share, (peer.name, after, batches)
        assert m['pgvpn_receiver_wakeups_total{cause="notify"}'] > 50 * \
            max(1.0, m['pgvpn_receiver_wakeups_total{cause="poll"}']), m
        assert m["pgvpn_unnotified_batches_total"] == 0, m
