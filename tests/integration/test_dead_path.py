"""A network path to the database that goes silent: noticed within seconds, not hours.

The agents reach PostgreSQL over TCP through their management link; taking the link's far end
down drops every packet without a word to either side (no RST, no ICMP), as a dead router or a
firewall's expired state does. Numbered datagrams flow both ways throughout; each direction must
arrive in order, nothing twice, and every datagram logged must be delivered.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from pgvpn_agent.lab import Lab, LabPeer, _run
from tests.integration.pump import Pump
from tests.integration.stream import eventually

pytestmark = pytest.mark.integration
DEAD_PATH = 10.0  # the agents' database.dead_path_timeout (default)


def first_log_line(peer: LabPeer, pattern: str, after: float) -> float | None:
    """Unix time of the first line of the agent's log matching `pattern` at or after `after`
    (the agent runs on this host: one clock)."""
    for line in Path(peer.log).read_text().splitlines():
        if re.search(pattern, line):
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if stamp >= after - 0.5:
                return stamp
    return None


def cut(peer: LabPeer, down: bool) -> None:
    _run(["ip", "link", "set", peer.mgmt_if, "down" if down else "up"])


def reconnected(lab: Lab, peer: LabPeer) -> None:
    m = lab.agent_metrics(peer)
    for d in ("tx", "rx"):
        assert m[f'pgvpn_db_reconnects_total{{direction="{d}"}}'] >= 1, m
        assert m[f'pgvpn_db_up{{direction="{d}"}}'] == 1, m


def test_a_blackholed_path_is_noticed_and_healed(make_lab):
    lab = make_lab(peers=2, tcp=True, transport={"max_age": 120.0})
    a, b = lab.peers
    ab, ba = Pump(lab, a, b, port=7701), Pump(lab, b, a, port=7702)
    time.sleep(2)
    cut_at = time.time()
    cut(a, down=True)
    time.sleep(30)
    restored_at = time.time()
    cut(a, down=False)
    eventually(lambda: reconnected(lab, a), timeout=20)
    back_at = time.time()
    time.sleep(3)
    (_, received_ab, walk_ab), (_, received_ba, walk_ba) = ab.finish(), ba.finish()
    assert walk_ab.repeats == walk_ba.repeats == 0, "a datagram was delivered twice"
    noticed = first_log_line(a, r"(sender|receiver): database error", cut_at)
    assert noticed is not None, "the dead path was never noticed"
    print(f"dead path: noticed {noticed - cut_at:.1f}s after the cut, reconnected "
          f"{back_at - restored_at:.1f}s after the path came back; delivered "
          f"{len(received_ab)}/{ab.sent} a->b, {len(received_ba)}/{ba.sent} b->a")
    assert noticed - cut_at <= DEAD_PATH + 3
    assert back_at - restored_at <= 10
    assert len(received_ab) > 0.5 * ab.sent and len(received_ba) > 0.5 * ba.sent


def test_a_reconnecting_agent_ends_its_own_stale_session(make_lab):
    """The server keeps a silent client's session (and the agent's lock) as long as its own
    keepalives allow — here the kernel's 2 hours. The agent, back first, ends that session
    itself instead of being refused as "already running"."""
    lab = make_lab(peers=2, tcp=True, transport={"max_age": 120.0},
                   pg_settings={"tcp_keepalives_idle": "0", "tcp_user_timeout": "0",
                                "client_connection_check_interval": "0"})
    a, b = lab.peers
    ab = Pump(lab, a, b, port=7711)
    time.sleep(1)
    cut_at = time.time()
    cut(a, down=True)
    time.sleep(DEAD_PATH + 4)
    cut(a, down=False)
    eventually(lambda: reconnected(lab, a), timeout=20)
    ended = first_log_line(a, r"ending this agent's own database session", cut_at)
    assert ended is not None, "the agent waited for the server instead"
    _, received, w = ab.finish()
    assert w.repeats == 0
    print(f"stale session: ended {ended - cut_at:.1f}s after the cut; {len(received)} "
          f"of {ab.sent} delivered")
    assert "another pgvpn agent is connected" not in Path(a.log).read_text()
