"""Faults mid-transfer: the tunnel heals by itself and every logged packet arrives exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

from pgvpn_agent.lab import Lab, LabPeer
from tests.integration.stream import Stream

pytestmark = pytest.mark.integration
PORT = 7001


def logged_numbers(lab: Lab) -> list[int]:
    """Datagram numbers of every row of the stream, in log order per link."""
    with psycopg.connect(lab.dsn()) as conn:
        rows = conn.execute("SELECT payload FROM pgvpn.packet WHERE dst_port = %s ORDER BY seq",
                            (PORT,)).fetchall()
    return [int(bytes(p)[28:].split(b" ", 1)[0]) for (p,) in rows]


def kill_and_restart(lab: Lab, peer: LabPeer, down_for: float) -> None:
    os.kill(peer.pid, signal.SIGKILL)
    lab.stop_agent(peer)  # reaps it
    time.sleep(down_for)
    lab.start_agent(peer)


def settle(stream: Stream, lab: Lab, timeout: float = 30) -> None:
    """Wait until everything logged has been delivered (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(stream.received) >= len(logged_numbers(lab)):
            time.sleep(0.5)
            return
        time.sleep(0.2)


def assert_exactly_once(lab: Lab, received: list[int]) -> list[int]:
    logged = logged_numbers(lab)
    assert len(logged) == len(set(logged)), "a datagram was logged twice"
    assert len(received) == len(set(received)), f"duplicates delivered: {len(received)}"
    assert sorted(received) == sorted(logged), (
        f"logged but not delivered: {sorted(set(logged) - set(received))[:20]}; "
        f"delivered but not logged: {sorted(set(received) - set(logged))[:20]}")
    return logged


def test_agents_killed_and_restarted_mid_transfer(make_lab):
    lab = make_lab(peers=2, transport={"max_age": 300.0})
    a, b = lab.peers
    stream = Stream(lab, a, b, port=PORT)
    accepted = last_ok = 0
    for n in range(1, 401):
        if stream.send(n):
            accepted += 1
            last_ok = n
        time.sleep(0.005)
        if n == 100:
            # the sending side dies with packets in flight, and comes back
            kill_and_restart(lab, a, down_for=0.3)
            lab.wait_mesh(timeout=30)
        if n == 250:
            # the receiving side dies; packets keep being logged while it is away. Kill it
            # between two deliveries: a TUN write and the cursor commit that follows it cannot
            # be one atomic step, so killing inside that microsecond window is not a fault any
            # design could make exactly-once (see README, delivery guarantees).
            assert stream.wait_for(last_ok, timeout=15)
            time.sleep(0.05)
            kill_and_restart(lab, b, down_for=1.0)
    settle(stream, lab)
    received = stream.close()
    logged = assert_exactly_once(lab, received)
    # Only what the kernel had queued for the killed sender, not yet logged, is gone.
    assert accepted - 20 <= len(logged) <= accepted
    assert accepted > 200 and 400 in received, "the tunnel did not come back"


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
    settle(stream, lab)
    received = stream.close()
    assert_exactly_once(lab, received)
    assert sorted(received) == list(range(1, 41))


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarted_mid_transfer(make_lab, mode):
    lab = make_lab(peers=2, transport={"max_age": 300.0})
    a, b = lab.peers
    stream = Stream(lab, a, b, port=PORT)
    restart = threading.Thread(target=lab.restart_postgres, args=(mode,))
    for n in range(1, 401):
        assert stream.send(n)
        time.sleep(0.005)
        if n == 150:
            restart.start()
    restart.join()
    settle(stream, lab, timeout=60)
    received = stream.close()
    assert_exactly_once(lab, received)
    # Nothing was lost: packets captured during the outage waited in the agent's queue.
    assert sorted(received) == list(range(1, 401))
    assert lab.ping(a, b) and lab.ping(b, a, v6=True)
