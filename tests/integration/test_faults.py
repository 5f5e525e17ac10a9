"""Faults of the database and clean stops mid-transfer: every logged datagram arrives once, in
order, and the agents say they reconnected.

Kills of the agent itself, at each point of a packet's path, are in test_kill_points.py; a
silent network path in test_dead_path.py; a database that lost commits in test_lost_commits.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgvpn_agent.lab import Lab, LabPeer
from tests.integration.pump import Pump, back_after
from tests.integration.stream import Stream, eventually

pytestmark = pytest.mark.integration
PORT = 7001


def reconnected(lab: Lab, peer: LabPeer) -> None:
    m = lab.agent_metrics(peer)
    for d in ("tx", "rx"):
        assert m[f'pgvpn_db_reconnects_total{{direction="{d}"}}'] >= 1, m
        assert m[f'pgvpn_db_up{{direction="{d}"}}'] == 1, m


def test_sigterm_commits_every_cursor_it_delivered(make_lab):
    """One-way traffic waits save_delay for a batch to carry its cursor; a stopping agent
    commits it first, so its restart delivers nothing twice."""
    lab = make_lab(peers=2, transport={"max_age": 300.0, "save_delay": 1.0})
    a, b = lab.peers
    stream = Stream(lab, a, b, port=PORT)
    for n in range(1, 21):
        assert stream.send(n)
        time.sleep(0.005)
    assert stream.wait_for(20, timeout=10)
    lab.stop_agent(b)  # SIGTERM, well inside save_delay
    link = ("FROM pgvpn.{} WHERE src = (SELECT id FROM pgvpn.peer WHERE name = 'peer1') "
            "AND dst = (SELECT id FROM pgvpn.peer WHERE name = 'peer2')")
    assert lab.psql("SELECT rx_seq " + link.format("cursor")) == lab.psql(
        "SELECT tx_seq " + link.format("link"))
    lab.start_agent(b)
    lab.wait_mesh(timeout=30)
    for n in range(21, 41):
        assert stream.send(n)
        time.sleep(0.005)
    stream.wait_count(40, timeout=15)
    assert stream.close() == list(range(1, 41))


def test_sigterm_during_a_database_outage_keeps_the_cursors(make_lab):
    """Stopped while the database is away, the receiver cannot commit what it delivered: it
    keeps the cursors in its state directory and commits them at the next start."""
    lab = make_lab(peers=2, transport={"max_age": 300.0, "save_delay": 1.0})
    a, b = lab.peers
    stream = Stream(lab, a, b, port=PORT)
    sent = 0
    with psycopg.connect(lab.dsn()) as holder:
        for _ in range(5):
            for n in range(sent + 1, sent + 21):
                assert stream.send(n)
                time.sleep(0.002)
            sent += 20
            assert stream.wait_for(sent, timeout=10)
            # Within save_delay of the delivery: lock the cursor before the receiver saves it,
            # so that its save waits until the database goes away.
            holder.execute("BEGIN")
            row = holder.execute(
                "SELECT c.rx_seq < l.tx_seq FROM pgvpn.cursor c JOIN pgvpn.link l USING (src, dst) "
                "WHERE c.src = (SELECT id FROM pgvpn.peer WHERE name = 'peer1') "
                "AND c.dst = (SELECT id FROM pgvpn.peer WHERE name = 'peer2') FOR UPDATE OF c"
            ).fetchone()
            if row and row[0]:
                break
            holder.execute("ROLLBACK")  # saved already (a slow machine): again
        else:
            pytest.fail("the receiver always saved its cursor before the test could lock it")
        time.sleep(1.5)  # past save_delay: the save is stuck on the lock
        lab.stop_postgres("fast")
        holder.close()
    time.sleep(0.5)
    lab.stop_agent(b)
    assert "cursors of what was delivered are kept" in Path(b.log).read_text()
    lab.start_postgres()
    lab.start_agent(b)
    lab.wait_mesh(timeout=30)
    for n in range(sent + 1, sent + 21):
        assert stream.send(n)
        time.sleep(0.005)
    stream.wait_count(sent + 20, timeout=15)
    assert stream.close() == list(range(1, sent + 21)), "delivered twice after the restart"
    assert "committed the cursors the last run kept" in Path(b.log).read_text()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarted_mid_transfer(make_lab, mode):
    lab = make_lab(peers=2, transport={"max_age": 300.0})
    a, b = lab.peers
    ab, ba = Pump(lab, a, b, port=PORT, every=0.005), Pump(lab, b, a, port=PORT + 1, every=0.005)
    time.sleep(1.0)
    began = time.monotonic()
    restart = threading.Thread(target=lab.restart_postgres, args=(mode,))
    restart.start()
    restart.join()
    restarted = time.monotonic()
    back = back_after([ab, ba], restarted)
    for peer in (a, b):
        eventually(lambda peer=peer: reconnected(lab, peer), timeout=30)
    time.sleep(1.0)
    for pump in (ab, ba):
        logged, received, walk = pump.finish(settle=60)
        # Nothing lost: packets captured during the outage waited in the agent's queue.
        assert logged == pump.accepted, "a datagram the kernel took was never logged"
        assert received == logged and walk.repeats == 0
    print(f"\npostgres {mode} restart: took {restarted - began:.2f}s; first new datagram "
          f"{back[0] - restarted:.2f}s (a->b) and {back[1] - restarted:.2f}s (b->a) after it; "
          f"{len(ab.accepted)} + {len(ba.accepted)} datagrams, 0 lost, 0 repeated")
    assert lab.ping(a, b) and lab.ping(b, a, v6=True)
