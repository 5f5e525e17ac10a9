"""Payload encryption at rest: the log keeps its headers, loses its contents to the keyless."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.stream import Stream, deliver, eventually

pytestmark = pytest.mark.integration

PORT = 7788
PGVPN = [sys.executable, "-m", "pgvpn_agent"]


def test_sealed_log_still_carries_ping_and_iperf3(make_lab):
    lab = make_lab(peers=2, encrypt=True)  # up() returns once v4 and v6 pings went through
    a, b = lab.peers
    assert lab.ping(a, b, count=3)
    report = lab.iperf(a, b, seconds=2)
    assert report["end"]["sum_received"]["bytes"] > 0

    assert deliver(lab, a, b, PORT, 10) == list(range(1, 11))
    rows = lab.psql(
        "SELECT protocol, dst_port, length, length(payload), get_byte(payload, 0), "
        "position('1 ....'::bytea IN payload) FROM pgvpn.packet "
        f"WHERE dst_port = {PORT} ORDER BY seq")
    lines = rows.splitlines()
    assert len(lines) == 10
    size = 20 + 8 + len("1 ") + 200
    # Headers stay queryable; the stored payload is key id 1, nonce, ciphertext and tag.
    assert lines[0] == f"17|{PORT}|{size}|{size + 29}|1|0"
    plain = lab.psql("SELECT count(*) FROM pgvpn.packet "
                     "WHERE position('....................'::bytea IN payload) > 0")
    assert plain == "0", "no stored payload contains the datagrams' text"

    # The receiving peer's config opens its packets for a pcap export that tshark reads.
    export = subprocess.run([*PGVPN, "pcap", "--config", b.config, "--port", str(PORT), "-o", "-"],
                            check=True, capture_output=True)
    # udp.payload, not data.data: a random source port can make tshark pick another dissector
    fields = subprocess.run(["tshark", "-r", "-", "-T", "fields", "-e", "udp.dstport",
                             "-e", "udp.payload"], input=export.stdout, check=True,
                            capture_output=True).stdout.decode().splitlines()
    assert len(fields) == 10
    port, data = fields[0].split("\t")
    assert port == str(PORT)
    assert bytes.fromhex(data.replace(":", "")).startswith(b"1 ....")


def test_tampered_or_moved_rows_are_dropped_not_delivered(make_lab):
    lab = make_lab(peers=2, encrypt=True)
    a, b = lab.peers
    stream = Stream(lab, a, b, port=PORT)
    try:
        lab.stop_agent(b)  # rows wait in the log while a database administrator edits them
        for n in range(1, 9):
            stream.send(n)
        def logged() -> None:
            assert lab.psql(f"SELECT count(*) FROM pgvpn.packet WHERE dst_port = {PORT}") == "8"
        eventually(logged)
        seqs = lab.psql(f"SELECT seq FROM pgvpn.packet WHERE dst_port = {PORT} ORDER BY seq")
        s = [int(x) for x in seqs.splitlines()]
        # datagram 3: one bit flipped; datagram 4: replaced by a copy of datagram 5's row
        lab.psql("UPDATE pgvpn.packet SET payload = set_byte(payload, 20, "
                 f"get_byte(payload, 20) # 1) WHERE dst_port = {PORT} AND seq = {s[2]}")
        lab.psql("UPDATE pgvpn.packet p SET payload = q.payload FROM pgvpn.packet q "
                 f"WHERE p.dst_port = {PORT} AND q.dst_port = {PORT} "
                 f"AND p.seq = {s[3]} AND q.seq = {s[4]}")
        lab.start_agent(b)
        stream.wait_count(6, timeout=20)
    finally:
        received = stream.close()
    assert received == [1, 2, 5, 6, 7, 8]

    def counted() -> None:
        m = lab.agent_metrics(b)
        assert m.get('pgvpn_packets_dropped_total{reason="unsealable"}') == 2, m
    eventually(counted)
