"""Rows that vanish from the log before their receiver read them are noticed and counted.

A receiver expects each link's sequence numbers without a hole; a hole (rows lost to a restore,
deleted by hand) is counted and logged, and delivery goes on past it in order. Retention that
drops a day holding rows no receiver has read says so (a peer long offline, or removed).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.stream import Stream, eventually

pytestmark = pytest.mark.integration
PGVPN = [sys.executable, "-m", "pgvpn_agent"]


def test_a_hole_in_a_link_is_counted_and_delivery_goes_on(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    lab.stop_agent(b)
    stream = Stream(lab, a, b, port=7951)
    for n in range(1, 21):
        assert stream.send(n)
    eventually(lambda: _equal(lab.psql("SELECT count(*) FROM pgvpn.packet "
                                        "WHERE dst_port = 7951"), "20"))
    lost = lab.psql("WITH gone AS (DELETE FROM pgvpn.packet WHERE dst_port = 7951 AND seq IN "
                    "(SELECT seq FROM pgvpn.packet WHERE dst_port = 7951 ORDER BY seq "
                    "OFFSET 4 LIMIT 5) RETURNING 1) SELECT count(*) FROM gone")
    assert lost == "5"
    lab.start_agent(b)
    lab.wait_mesh(30)
    stream.wait_count(15, timeout=10)
    assert stream.close() == [1, 2, 3, 4, *range(10, 21)]
    assert lab.agent_metrics(b)['pgvpn_sequence_gap_packets_total{peer="peer1"}'] == 5
    assert "5 sequence numbers from peer1 are missing from the log" in Path(b.log).read_text()


def test_a_number_the_log_holds_twice_is_delivered_once_and_the_agent_stays_up(make_lab):
    """Only the owner can write around send_batch(): rows copied back in (a restore into a
    live log) repeat numbers already delivered or about to be. Each goes out once, in order."""
    lab = make_lab(peers=2)
    a, b = lab.peers
    stream = Stream(lab, a, b, port=7952)
    for n in range(1, 6):
        assert stream.send(n)
    stream.wait_count(5, timeout=10)
    lab.stop_agent(b)
    for n in range(6, 11):
        assert stream.send(n)
    eventually(lambda: _equal(lab.psql("SELECT count(*) FROM pgvpn.packet "
                                        "WHERE dst_port = 7952"), "10"))
    # every row of the stream again, a second later: five delivered, five not yet
    lab.psql("INSERT INTO pgvpn.packet SELECT src_peer, dst_peer, seq, sent_at, "
             "logged_at + interval '1 second', ip_version, src_addr, dst_addr, protocol, "
             "src_port, dst_port, length, fragment, payload, offload FROM pgvpn.packet "
             "WHERE dst_port = 7952")
    lab.start_agent(b)
    lab.wait_mesh(30)
    for n in range(11, 16):
        assert stream.send(n)
    stream.wait_count(15, timeout=10)
    time.sleep(0.5)
    assert stream.close() == list(range(1, 16))
    metrics = lab.agent_metrics(b)
    assert metrics['pgvpn_packets_dropped_total{reason="repeated"}'] == 5, metrics
    assert metrics['pgvpn_sequence_gap_packets_total{peer="peer1"}'] == 0, metrics


def test_retention_counts_rows_no_receiver_read(make_lab):
    lab = make_lab(peers=2, agents=False)
    ids = dict(r.split("=") for r in lab.psql("SELECT name || '=' || id FROM pgvpn.peer").split())
    lab.psql("SET ROLE pgvpn_owner; CREATE TABLE pgvpn.packet_20200101 PARTITION OF "
             "pgvpn.packet FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00')")
    lab.psql("INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, logged_at, ip_version, "
             f"src_addr, dst_addr, protocol, length, payload) SELECT {ids['peer1']}, "
             f"{ids['peer2']}, g, '2020-01-01 12:00+00', '2020-01-01 12:00+00', 4, '10.77.0.1', "
             "'10.77.0.2', 17, 20, '\\x45' FROM generate_series(1, 10) g")
    lab.psql(f"UPDATE pgvpn.cursor SET rx_seq = 3 WHERE src = {ids['peer1']} "
             f"AND dst = {ids['peer2']}")
    out = subprocess.run([*PGVPN, "db", "retention", "--dsn", lab.dsn("pgvpn_housekeeping"),
                          "--keep-days", "7"], check=True, capture_output=True, text=True).stdout
    assert "dropped packet_20200101" in out and "7 rows never delivered" in out, out


def _equal(value: object, expected: object) -> None:
    assert value == expected, value
