"""TUN offload: TCP bursts travel as one row each, with the header the receiver's kernel needs.

With offload on (the default) the kernel hands the sender TSO bursts of up to 64 KB with a
partial checksum; they are logged whole, with their virtio-net header, and written back so that
the receiving kernel sees the same burst. A peer without offload still takes bursts from one
that has it, and the log stays readable: `pgvpn pcap` exports a burst that tshark decodes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgvpn_agent import tun
from pgvpn_agent.lab import LabPeer
from tests.integration import tcpblast
from tests.integration.stream import eventually

pytestmark = pytest.mark.integration
PGVPN = [sys.executable, "-m", "pgvpn_agent"]
BLAST = str(Path(tcpblast.__file__))


def rows(lab, src: LabPeer) -> list[tuple[int, bytes | None]]:
    """(length, offload header) of every row src sent."""
    out = lab.psql("SELECT length, coalesce(encode(offload, 'hex'), '') FROM pgvpn.packet p "
                   f"JOIN pgvpn.peer s ON s.id = p.src_peer WHERE s.name = '{src.name}'")
    return [(int(n), bytes.fromhex(h) if h else None)
            for n, h in (line.split("|") for line in out.splitlines())]


def delivered_all(lab) -> None:
    """Every link's receiver is at its sender's last sequence number."""
    lag = lab.psql("SELECT count(*) FROM pgvpn.link l JOIN pgvpn.cursor c USING (src, dst) "
                   "WHERE c.rx_seq <> l.tx_seq")
    assert lag == "0", lag


def test_tcp_bursts_are_one_row_each_and_arrive_whole(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    report = lab.iperf(a, b, seconds=3)
    received = report["end"]["sum_received"]["bytes"]
    assert received > 1_000_000
    sent = rows(lab, a)
    bursts = [(n, h) for n, h in sent if h is not None and tun.segments(h, n) > 1]
    assert bursts, "iperf3 over TUN offload produced no TSO burst"
    for n, header in bursts:
        flags, gso_type, _, gso_size, csum_start, csum_offset = tun.VNET.unpack(header)
        assert n > lab.mtu and gso_type == tun.GSO_TCPV4 and flags == tun.NEEDS_CSUM
        assert 0 < gso_size <= lab.mtu - 40 and (csum_start, csum_offset) == (20, 16)
    # far fewer rows than the wire-sized packets they stand for
    segments = sum(tun.segments(h, n) for n, h in sent)
    assert len(sent) * 3 < segments, (len(sent), segments)
    assert sum(n for n, _ in sent) > received
    # the database counts wire packets as the agent does: per row, in the views, in `pgvpn log`
    in_sql = lab.psql("SELECT sum(pgvpn.segments(offload, length)) FROM pgvpn.packet "
                      f"WHERE src_peer = (SELECT id FROM pgvpn.peer WHERE name = '{a.name}')")
    assert int(in_sql) == segments
    flow = lab.psql("SELECT packets, segments FROM pgvpn.flow WHERE protocol = 6 AND "
                    f"src_peer = '{a.name}' AND dst_port = 5201 ORDER BY bytes DESC LIMIT 1")
    packets, wire_packets = map(int, flow.split("|"))
    assert wire_packets > packets
    out = subprocess.run([*PGVPN, "log", "--dsn", lab.dsn(), "--src-peer", a.name, "--proto",
                          "tcp", "--port", "5201", "--json"], check=True, capture_output=True,
                         text=True).stdout
    assert max(json.loads(line)["segments"] for line in out.splitlines()) > 1
    eventually(lambda: delivered_all(lab))
    assert lab.ping(a, b, count=2) and lab.ping(b, a, v6=True, count=2)


def test_a_burst_exports_to_pcap_whole(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    lab.iperf(a, b, seconds=2)
    length, seq = lab.psql("SELECT length, seq FROM pgvpn.packet WHERE length > 10000 "
                           "ORDER BY seq LIMIT 1").split("|")
    export = subprocess.run([*PGVPN, "pcap", "--dsn", lab.dsn(), "--proto", "tcp",
                             "--src-peer", a.name, "-o", "-"], check=True,
                            capture_output=True).stdout
    lengths = subprocess.run(["tshark", "-r", "-", "-T", "fields", "-e", "ip.len"],
                             input=export, check=True, capture_output=True).stdout.split()
    assert length.encode() in lengths, (length, seq)


def test_a_peer_without_offload_takes_bursts_from_one_with_it(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    lab.stop_agent(b)
    with open(b.config) as f:
        config = f.read()
    with open(b.config, "w") as f:
        f.write(config.replace("offload = true", "offload = false"))
    lab.start_agent(b)
    lab.wait_mesh(30)
    lab.iperf(a, b, seconds=2)  # bursts from a into b's plain TUN
    lab.iperf(b, a, seconds=2)  # wire-sized packets from b
    assert any(h is not None and tun.segments(h, n) > 1 for n, h in rows(lab, a))
    assert all(h is None and n <= lab.mtu for n, h in rows(lab, b))
    eventually(lambda: delivered_all(lab))


def test_without_offload_every_row_fits_the_mtu(make_lab):
    lab = make_lab(peers=2, offload=False)
    a, b = lab.peers
    lab.iperf(a, b, seconds=2)
    sent = rows(lab, a)
    assert len(sent) > 100 and all(h is None and n <= lab.mtu for n, h in sent)


@pytest.mark.parametrize("join", [True, False], ids=["joined", "as-read"])
def test_parallel_flows_arrive_whole_and_in_order_with_their_bursts_joined(make_lab, join):
    """Eight TCP connections at once (small bursts each, ten or so of a flow per batch), four
    of them over IPv6: every connection's bytes arrive intact and in order, and with
    tun.join_bursts a flow's back-to-back bursts share a row."""
    lab = make_lab(peers=2, join_bursts=join)
    a, b = lab.peers
    size = 3 << 20
    done = []
    for dst, port in ((b.ipv4, 7301), (b.ipv6, 7302)):
        receiver = subprocess.Popen(["ip", "netns", "exec", b.netns, sys.executable, BLAST,
                                     "recv", str(port), "4"], stdout=subprocess.PIPE, text=True)
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        sent = lab.exec(a, [sys.executable, BLAST, "send", dst, str(port), "4", str(size)],
                        timeout=120)
        assert sent.returncode == 0, sent.stderr
        out, _ = receiver.communicate(timeout=60)
        done += json.loads(out)
    expected = [hashlib.sha256(tcpblast.stream(i, size)).hexdigest() for i in range(4)] * 2
    assert [(r["got"], r["sha256"]) for r in done] == [(size, h) for h in expected]
    joined = lab.agent_metrics(a)["pgvpn_tcp_bursts_joined_total"]
    sent_rows = rows(lab, a)
    if join:
        assert joined > 0, joined
        # a joined row stays a burst a kernel takes: at most 64 KB, one segment size
        assert max(n for n, _ in sent_rows) <= 65535
    else:
        assert joined == 0
    delivered_all(lab)
