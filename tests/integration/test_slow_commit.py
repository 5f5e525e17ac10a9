"""A sender stuck in a slow commit must not stall the other direction, nor spin a core.

The agent's sender carries its receiver's cursors in its batch (delivered.py); while that
transaction waits (here: a row lock an operator holds on the sender's link for 8 s, as a long
commit, a synchronous standby or a checkpoint would), the receiver cannot save those cursors —
but it keeps delivering what arrives the other way, in order, on a few polls a second.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.integration.stream import Stream

pytestmark = pytest.mark.integration
HOLD = 8.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("sealed", [False, True], ids=["fetched", "carried"])
def test_receiver_delivers_while_its_sender_waits_on_a_commit(make_lab, sealed):
    """Sealed, what arrives meanwhile rides in its notification as it would otherwise: the
    stalled receiver's polls do not read the table in its place."""
    lab = make_lab(peers=2, encrypt=sealed)
    p1, p2 = lab.peers
    inbound = Stream(lab, p2, p1, port=7601)   # what p1's receiver must keep delivering
    held = threading.Event()
    failures: list[BaseException] = []

    def hold_link_row() -> None:
        try:
            with psycopg.connect(lab.dsn(), autocommit=False) as admin:
                admin.execute("SELECT * FROM pgvpn.link WHERE src = (SELECT id FROM pgvpn.peer "
                              "WHERE name = 'peer1') FOR UPDATE")
                held.set()
                time.sleep(HOLD)
                admin.rollback()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)
            held.set()

    n = 0
    for _ in range(20):
        n += 1
        inbound.send(n)
        time.sleep(0.02)
    assert inbound.wait_for(n, timeout=10)
    locker = threading.Thread(target=hold_link_row)
    locker.start()
    held.wait(10)
    # p1's echo reply leaves at once, in a batch that carries the cursor of the request it
    # answers: that batch now waits on the lock, with the cursor
    assert not lab.ping(p2, p1)
    time.sleep(0.3)
    carried_before = lab.agent_metrics(p1).get("pgvpn_carried_packets_total", 0.0)
    cpu_before, started = cpu_seconds(p1.pid), time.monotonic()
    during = []
    while time.monotonic() - started < HOLD - 2:
        n += 1
        inbound.send(n)
        during.append(n)
        time.sleep(0.05)
    assert inbound.wait_for(during[-1], timeout=2), "p1 stopped delivering behind its sender"
    cpu = cpu_seconds(p1.pid) - cpu_before
    elapsed = time.monotonic() - started
    carried = lab.agent_metrics(p1).get("pgvpn_carried_packets_total", 0.0) - carried_before
    locker.join()
    assert not failures, failures
    received = inbound.close()
    assert lab.ping(p2, p1), "the stuck batch went through, the tunnel is whole"
    print(f"slow commit: p1 used {cpu:.2f} s of CPU in {elapsed:.1f} s, delivered "
          f"{len(during)} datagrams meanwhile, {carried:.0f} carried")
    assert received == list(range(1, n + 1)), "lost, repeated or reordered"
    assert cpu < 0.3 * elapsed, "the receiver spins while its sender waits"
    if sealed:  # (a poll that times out as a row commits may read it first: rare)
        assert carried >= 0.9 * len(during), f"{carried:.0f} of {len(during)} carried"
