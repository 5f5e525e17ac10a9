"""Peers whose clocks are minutes off deliver like any other: only the database's clock counts.

A VM after a suspend, a dead RTC: the sender's capture time (sent_at) is kept as information,
while a packet's age (transport.max_age) and its day partition come from the database's clock
(logged_at). Runs each agent under libfaketime, one five minutes behind, one five ahead.
"""

from __future__ import annotations

import time

import pytest

from pgvpn_agent.lab import LIBFAKETIME
from tests.integration.pump import Pump

pytestmark = pytest.mark.integration


def skewed(seconds: int) -> dict[str, str]:
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{seconds:+d}",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}


def test_peers_with_skewed_clocks_deliver_in_order(make_lab):
    lab = make_lab(peers=2, agents=False)
    a, b = lab.peers
    lab.start_agent(a, env=skewed(-300))
    lab.start_agent(b, env=skewed(+300))
    lab.wait_mesh(30)
    ab, ba = Pump(lab, a, b, port=7801, every=0.01), Pump(lab, b, a, port=7802, every=0.01)
    time.sleep(1.5)
    for pump in (ab, ba):  # both ways at once, each in order, nothing lost, nothing twice
        logged, received, _ = pump.finish()
        assert received == logged == pump.accepted and len(logged) > 50
    # the capture times tell of the skew; the log's own time and partition do not
    skew = lab.psql("SELECT round(extract(epoch FROM avg(sent_at - logged_at))) || ' ' || "
                    "count(DISTINCT tableoid) FROM pgvpn.packet WHERE dst_port = 7801")
    offset, partitions = map(int, skew.split())
    assert -320 < offset < -280 and partitions == 1, skew
    for peer in lab.peers:
        assert lab.agent_metrics(peer)['pgvpn_packets_dropped_total{reason="too_old"}'] == 0
