"""A peer the agent's config does not list — registered by another site's deployment, being
added, or removed from the inventory — must not take that agent down: its links are not
followed and its rows stay in the log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pgvpn_agent.lab import LabPeer
from tests.integration.stream import deliver

pytestmark = pytest.mark.integration
PGVPN = [sys.executable, "-m", "pgvpn_agent"]


def test_a_link_from_an_unconfigured_peer_leaves_the_agent_up(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    out = subprocess.run([*PGVPN, "db", "register", "--dsn", lab.dsn("pgvpn_housekeeping"),
                          "ghost"], check=True, capture_output=True, text=True).stdout
    assert out.startswith("ghost=")
    ghost, a_id = out.split("=")[1].strip(), lab.psql("SELECT id FROM pgvpn.peer "
                                                      "WHERE name = 'peer1'")
    # what ghost's agent would have logged for peer1, as its login would through send_batch()
    lab.psql(f"UPDATE pgvpn.link SET tx_seq = 1 WHERE src = {ghost} AND dst = {a_id}; "
             "INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, ip_version, src_addr, "
             f"dst_addr, protocol, length, payload) VALUES ({ghost}, {a_id}, 1, now(), 4, "
             "'10.77.0.9', '10.77.0.1', 17, 28, '\\x4500001c')")
    for peer in (a, b):  # restarted: they load every cursor addressed to them
        lab.stop_agent(peer)
        lab.start_agent(peer)
    lab.wait_mesh(30)
    assert deliver(lab, a, b, port=7901, count=20) == list(range(1, 21))
    assert deliver(lab, b, a, port=7902, count=20) == list(range(1, 21))
    assert _alive(lab, a) and "Traceback" not in Path(a.log).read_text()
    assert lab.psql(f"SELECT rx_seq FROM pgvpn.cursor WHERE src = {ghost} AND dst = {a_id}") \
        == "0", "the unknown link's row stays undelivered in the log"


def _alive(lab, peer: LabPeer) -> bool:
    return lab.status()["peers"][int(peer.name[-1]) - 1]["running"]
