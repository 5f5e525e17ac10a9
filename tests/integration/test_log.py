"""The log as a product: `pgvpn log` finds packets, `pgvpn pcap` exports them for tshark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.stream import Stream

pytestmark = pytest.mark.integration
PGVPN = [sys.executable, "-m", "pgvpn_agent"]


@pytest.fixture
def lab(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    stream = Stream(lab, a, b, port=7300, v6=False)
    for n in range(1, 11):
        stream.send(n)
    stream.wait_count(10, timeout=10)
    stream.close()
    lab.ping(b, a, v6=True, count=3)
    return lab


def test_log_finds_a_known_udp_packet_by_port(lab):
    out = subprocess.run([*PGVPN, "log", "--dsn", lab.dsn(), "--port", "7300", "--json"],
                         check=True, capture_output=True, text=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 10
    first = records[0]
    assert (first["src_peer"], first["dst_peer"], first["protocol"], first["dst_port"]) == (
        "peer1", "peer2", 17, 7300)
    assert first["src_addr"] == lab.peers[0].ipv4 and first["length"] == 20 + 8 + 2 + 200
    assert first["segments"] == 1
    table = subprocess.run([*PGVPN, "log", "--dsn", lab.dsn(), "--proto", "icmpv6",
                            "--src-peer", "peer2", "--since", "10m"],
                           check=True, capture_output=True, text=True).stdout
    assert "icmpv6" in table and lab.peers[1].ipv6 in table
    bad = subprocess.run([*PGVPN, "log", "--dsn", lab.dsn(), "--since", "yesterday"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_log_takes_the_database_from_libpq_environment(lab):
    """Like psql: no --dsn, the PG* variables name the database."""
    env = {**os.environ, "PGHOST": str(lab.sockdir), "PGPORT": str(lab.port),
           "PGDATABASE": "pgvpn", "PGUSER": "postgres"}
    out = subprocess.run([*PGVPN, "log", "--port", "7300", "--json"], check=True, env=env,
                         capture_output=True, text=True).stdout
    assert len(out.splitlines()) == 10


def test_pcap_export_is_read_by_tshark(lab):
    export = subprocess.run([*PGVPN, "pcap", "--dsn", lab.dsn(), "--port", "7300", "-o", "-"],
                            check=True, capture_output=True)
    fields = subprocess.run(
        ["tshark", "-r", "-", "-T", "fields", "-e", "udp.dstport", "-e", "udp.payload",
         "-e", "frame.time_epoch"], input=export.stdout, check=True,
        capture_output=True).stdout.decode().splitlines()
    assert len(fields) == 10
    rows = lab.psql("SELECT encode(substring(payload FROM 29), 'hex'), "
                    "extract(epoch FROM sent_at) FROM pgvpn.packet WHERE dst_port = 7300 "
                    "ORDER BY logged_at, seq").splitlines()
    for line, row in zip(fields, rows, strict=True):
        port, data, stamp = line.split("\t")
        payload_hex, sent = row.split("|")
        assert port == "7300"
        assert data.replace(":", "") == payload_hex
        assert abs(float(stamp) - float(sent)) < 1e-6


def test_operator_views(lab):
    flows = lab.psql("SELECT src_peer, dst_peer, protocol, dst_port, packets, segments "
                     "FROM pgvpn.flow WHERE dst_port = 7300")
    assert flows == "peer1|peer2|17|7300|10|10"
    per_minute = lab.psql("SELECT sum(packets) FROM pgvpn.traffic_per_minute "
                          "WHERE src_peer = 'peer1' AND dst_peer = 'peer2'")
    assert int(per_minute) >= 10
    plan = lab.psql("EXPLAIN SELECT count(*) FROM pgvpn.packet WHERE logged_at >= "
                    "now() - interval '5 minutes' AND logged_at < now() + interval '1 minute'")
    # a time filter reads only the partitions it can match (days outside it are pruned)
    assert "Subplans Removed" in plan
