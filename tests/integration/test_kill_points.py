"""The agent killed (SIGKILL) at each point of a packet's path, many times, traffic both ways.

peer2's agent runs with PGVPN_KILL_AT=<point>:<n> (pgvpn_agent/faults.py) for a random n, dies
there, and is started again at once, as systemd would, twenty times per point, while numbered
datagrams flow peer1 -> peer2 and peer2 -> peer1 without pause. Both streams are then replayed
in order against the log (tests/ordering.py):

- into the killed agent (its receiver): nothing lost, in order; a datagram comes twice only
  because the restarted receiver went back to the row after its cursor as saved at its death;
- out of it (its sender): nothing twice, everything logged delivered in order; what it had not
  committed (the kernel's queue at its death) neither logged nor delivered;
- the living side's datagrams are all logged: none lost while the other is down.

Recovery — from the death to the first datagram the restarted agent delivers in each
direction — is printed per point with the counts.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest

from pgvpn_agent import faults
from pgvpn_agent.lab import Lab, LabPeer
from tests.integration.pump import Pump, logged_rows

pytestmark = pytest.mark.integration
KILLS = int(os.environ.get("PGVPN_KILLS", "20"))
# Passes of the point before the kill: a restarted agent first delivers a little, so that each
# recovery is measured, and dies at a different place of its traffic each time.
PASSES = (4, 40)


def death_of(peer: LabPeer) -> float | None:
    """Monotonic time now if the agent has died by SIGKILL, None while it runs."""
    try:
        pid, status = os.waitpid(peer.pid, os.WNOHANG)
    except ChildProcessError:  # reaped by someone else: it is gone all the same
        return time.monotonic()
    if not pid:
        return None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"{peer.name} exited with status {status}, not at its kill point:\n"
        + Path(peer.log).read_text()[-3000:])
    return time.monotonic()


def saved_cursor(lab: Lab, src: LabPeer, dst: LabPeer) -> int:
    """dst's cursor on the link from src, once no session of dst's login is left to move it."""
    deadline = time.monotonic() + 10
    while lab.psql("SELECT count(*) FROM pg_stat_activity "
                   f"WHERE usename = 'pgvpn_{dst.name}'") != "0":
        assert time.monotonic() < deadline, "the dead agent's sessions stayed"
        time.sleep(0.02)
    return int(lab.psql(f"""SELECT rx_seq FROM pgvpn.cursor
        WHERE src = (SELECT id FROM pgvpn.peer WHERE name = '{src.name}')
          AND dst = (SELECT id FROM pgvpn.peer WHERE name = '{dst.name}')"""))


@pytest.mark.parametrize("point", sorted(faults.POINTS))
def test_killed_at(make_lab, point):
    lab = make_lab(peers=2, transport={"max_age": 600.0})
    a, b = lab.peers
    into, out = Pump(lab, a, b, port=7601, every=0.01), Pump(lab, b, a, port=7602, every=0.01)
    rng = random.Random(point)

    def armed() -> dict[str, str]:
        return {faults.ENV: f"{point}:{rng.randint(*PASSES)}"}

    lab.stop_agent(b)  # SIGTERM; from here on it only ever dies by SIGKILL
    lab.start_agent(b, env=armed())
    cursors: list[int] = []  # b's saved cursor on a -> b at each death
    recovery: list[tuple[float, float]] = []
    deadline = time.monotonic() + 30
    while (death := death_of(b)) is None:
        assert time.monotonic() < deadline, f"{b.name} never reached {point}"
        time.sleep(0.005)
    for kill in range(KILLS):
        cursors.append(saved_cursor(lab, a, b))
        last = kill == KILLS - 1
        started, sent = time.monotonic(), out.sent
        lab.start_agent(b, env=None if last else armed())
        back: list[float | None] = [None, None]
        nxt = None
        deadline = time.monotonic() + 30
        while None in back and nxt is None:
            assert time.monotonic() < deadline, f"kill {kill}: no traffic after the restart"
            # into b: anything arriving once the new process runs is its delivery; out of b:
            # a datagram sent after the restart began, delivered by peer1
            back = [back[0] or into.first_arrival(started), back[1] or out.first_arrival(
                started, above=sent)]
            nxt = None if last else death_of(b)
            time.sleep(0.005)
        if None not in back:
            recovery.append((back[0] - death, back[1] - death))  # type: ignore[operator]
        if not last:
            deadline = time.monotonic() + 30
            while nxt is None:
                assert time.monotonic() < deadline, f"kill {kill + 1}: {point} never reached"
                time.sleep(0.005)
                nxt = death_of(b)
            death = nxt
    time.sleep(1)
    logged_in, _, walk_in = into.finish()
    logged_out, _, walk_out = out.finish()
    journal = Path(b.log).read_text()
    assert journal.count(f"kill point {point} reached") == KILLS, "a death was not at its point"

    # into b: every datagram peer1's kernel took is logged, all arrive, repeats only from cursors
    assert logged_in == into.accepted, "peer1's datagrams were lost while peer2 was down"
    seqs = [seq for seq, _ in logged_rows(lab, 7601)]
    restart_at = [sum(1 for s in seqs if s <= c) for c in cursors]
    pending = list(restart_at)
    for went_back, _ in walk_in.rewinds:
        assert went_back in pending, (
            f"peer2 delivered again from row {went_back}, not from a row after a saved cursor "
            f"({restart_at})")
        pending = pending[pending.index(went_back) + 1:]
    # out of b: nothing twice; lost only what its kernel had queued, never logged
    assert walk_out.repeats == 0, f"peer2's sender logged or delivered {walk_out.repeats} twice"
    lost_out = len(set(out.accepted) - set(logged_out))
    into_s = [r[0] for r in recovery]
    out_s = [r[1] for r in recovery]
    print(f"\n{point}: {KILLS} kills; into peer2 {len(logged_in)} logged, {walk_in.repeats} "
          f"repeated ({len(walk_in.rewinds)} rewinds), 0 lost; out of peer2 {len(logged_out)} "
          f"logged, 0 repeated, {lost_out} taken by its kernel and lost at its deaths; "
          f"recovery s (n={len(recovery)}) into median {statistics.median(into_s):.2f} max "
          f"{max(into_s):.2f}, out median {statistics.median(out_s):.2f} max {max(out_s):.2f}")
    assert len(recovery) >= KILLS // 2
    assert max(max(into_s), max(out_s)) < 10
