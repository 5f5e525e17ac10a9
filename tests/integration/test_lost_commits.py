"""A database that lost commits the sender saw: detected, said loudly, nothing skipped.

A restore from backup, a failover to a standby that missed the last commits, or commits made
asynchronous by a setting: the link's sequence in the database goes back. Reusing those numbers
would make the live receiver — whose cursor never moves back — skip the new packets. Here the
last ten batches of a link vanish (rows and sequence, and the receiver's saved cursor, as a
restore would leave them) and PostgreSQL restarts; the next datagrams must all arrive, in order,
whether the sender stayed up (its memory) or was restarted (its state file).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pgvpn_agent.lab import Lab, LabPeer
from tests.integration.stream import Stream, eventually

pytestmark = pytest.mark.integration
REGRESSIONS = 'pgvpn_sequence_regressions_total{peer="peer2"}'


def lose_last(lab: Lab, n: int, port: int) -> None:
    """What a restore to a point n datagrams back leaves of the link peer1 -> peer2."""
    link = ("src = (SELECT id FROM pgvpn.peer WHERE name = 'peer1') AND "
            "dst = (SELECT id FROM pgvpn.peer WHERE name = 'peer2')")
    lab.psql(f"""
        WITH gone AS (DELETE FROM pgvpn.packet WHERE dst_port = {port} AND seq > (
                          SELECT tx_seq - {n} FROM pgvpn.link WHERE {link}) RETURNING seq)
        SELECT count(*) FROM gone;
        UPDATE pgvpn.link SET tx_seq = tx_seq - {n} WHERE {link};
        UPDATE pgvpn.cursor c SET rx_seq = l.tx_seq FROM pgvpn.link l
        WHERE l.src = c.src AND l.dst = c.dst AND c.rx_seq > l.tx_seq""")


def run(lab: Lab, a: LabPeer, b: LabPeer, port: int, restart_sender: bool) -> None:
    stream = Stream(lab, a, b, port=port)
    for n in range(1, 31):
        assert stream.send(n)
    assert stream.wait_for(30, timeout=10)
    if restart_sender:
        lab.stop_agent(a)  # SIGTERM: its marks are written
    lose_last(lab, 10, port)
    lab.restart_postgres("immediate")
    if restart_sender:
        lab.start_agent(a)
    lab.wait_mesh(30)
    for n in range(31, 51):
        assert stream.send(n)
    stream.wait_count(50, timeout=15)
    assert stream.close() == list(range(1, 51)), "skipped, repeated or reordered"
    eventually(lambda: _equal(lab.agent_metrics(a)[REGRESSIONS], 1))
    assert "the database lost committed packets on the link to peer2" in Path(a.log).read_text()
    # the advance is on record: an operator tells the database's loss from a sender's jump
    assert lab.psql("SELECT to_seq - from_seq FROM pgvpn.link_advance") == "10"
    # the receiver had delivered what the database lost: for it nothing is missing
    assert lab.agent_metrics(b)['pgvpn_sequence_gap_packets_total{peer="peer1"}'] == 0


def test_live_sender_continues_past_what_the_database_lost(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    run(lab, a, b, port=7971, restart_sender=False)


def test_restarted_sender_remembers_what_the_database_lost(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    run(lab, a, b, port=7972, restart_sender=True)


def _equal(value: object, expected: object) -> None:
    assert value == expected, value
