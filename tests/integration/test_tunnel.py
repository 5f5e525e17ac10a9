"""The tunnel end to end: real PostgreSQL, real TUN devices in network namespaces."""

from __future__ import annotations

import time

import pytest

from pgvpn_agent.lab import LabPeer
from tests.integration.stream import Stream, deliver, eventually

pytestmark = pytest.mark.integration


def test_two_peers_ping_v4_and_v6(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    assert lab.ping(a, b, count=5)
    assert lab.ping(b, a, v6=True, count=5)


def test_three_peers_full_mesh(make_lab):
    # lab.up() returns only once every peer pinged every other one over v4 and v6.
    lab = make_lab(peers=3)
    links = lab.psql("SELECT count(*) FROM pgvpn.link WHERE tx_seq > 0")
    assert int(links) == 6


@pytest.mark.parametrize("mode", ["logged", "trigger", "payload"])
def test_every_mode_carries_ping(make_lab, mode):
    lab = make_lab(peers=2, mode=mode)
    a, b = lab.peers
    assert lab.ping(a, b, count=3)
    assert lab.ping(a, b, v6=True, count=3)
    rows = int(lab.psql("SELECT count(*) FROM pgvpn.packet"))
    if mode == "payload":
        assert rows == 0, "payload mode logs nothing"
    else:
        assert rows > 0


def test_iperf3_tcp_every_packet_is_one_row(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    report = lab.iperf(a, b, seconds=3)
    assert report["end"]["sum_received"]["bytes"] > 0
    # Per link: sequence numbers are 1..tx_seq with no gap and no duplicate, and the receiver
    # has delivered all of them.
    def sequences_complete() -> None:
        rows = lab.psql(
            "SELECT l.src, l.dst, l.tx_seq, c.rx_seq, count(p.seq), count(DISTINCT p.seq), "
            "coalesce(min(p.seq), 0), coalesce(max(p.seq), 0) "
            "FROM pgvpn.link l JOIN pgvpn.cursor c USING (src, dst) "
            "LEFT JOIN pgvpn.packet p ON p.src_peer = l.src AND p.dst_peer = l.dst "
            "GROUP BY 1, 2, 3, 4")
        for line in rows.splitlines():
            _, _, tx, rx, n, distinct, lo, hi = map(int, line.split("|"))
            assert n == distinct == tx == hi, line
            assert lo == 1 and rx == tx, line

    # Every packet the kernel handed to each TUN device is a row, a burst joined into the row
    # of an earlier one of its flow (counted), or a counted drop.
    def kernel_count_matches(peer: LabPeer) -> None:
        stats = lab.exec(peer, ["cat", f"/sys/class/net/{peer.tun}/statistics/tx_packets"])
        from_kernel = int(stats.stdout)
        logged = int(lab.psql("SELECT count(*) FROM pgvpn.packet p JOIN pgvpn.peer s "
                              f"ON s.id = p.src_peer WHERE s.name = '{peer.name}'"))
        m = lab.agent_metrics(peer)
        dropped = sum(v for k, v in m.items() if k.startswith("pgvpn_packets_dropped_total"))
        joined = m["pgvpn_tcp_bursts_joined_total"]
        assert from_kernel == logged + joined + dropped, (peer.name, from_kernel, logged, m)

    eventually(sequences_complete)
    for peer in lab.peers:
        eventually(lambda peer=peer: kernel_count_matches(peer))


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_known_udp_packets_are_destructured(make_lab, v6):
    lab = make_lab(peers=2)
    a, b = lab.peers
    assert deliver(lab, a, b, 7777, 20, v6=v6) == list(range(1, 21))
    rows = lab.psql(
        "SELECT ip_version, host(src_addr), host(dst_addr), protocol, dst_port, length, "
        "fragment, length(payload) FROM pgvpn.packet WHERE dst_port = 7777 ORDER BY seq")
    lines = rows.splitlines()
    assert len(lines) == 20
    header = 40 if v6 else 20
    size = header + 8 + len("1 ") + 200
    src, dst = (a.ipv6, b.ipv6) if v6 else (a.ipv4, b.ipv4)
    version = 6 if v6 else 4
    assert lines[0] == f"{version}|{src}|{dst}|17|7777|{size}|f|{size}"
    # the payload column is the packet itself: the datagram text is in it
    assert lab.psql("SELECT count(*) FROM pgvpn.packet WHERE dst_port = 7777 "
                    "AND position('1 ....'::bytea IN payload) > 0") != "0"


def test_coalescing_carries_every_packet_in_fewer_batches(make_lab):
    """Pairs of datagrams a fraction of a millisecond apart, 30 ms between pairs: without
    coalescing the sender logs most pairs in two transactions, with it in one."""
    lab = make_lab(peers=2, transport={"coalesce": 0.005})  # at 0: 97 batches for 100 rows
    a, b = lab.peers
    before = lab.agent_metrics(a)
    stream = Stream(lab, a, b, port=7400)
    for n in range(1, 101, 2):
        stream.send(n)
        stream.send(n + 1)
        time.sleep(0.03)
    stream.wait_count(100, timeout=10)
    assert sorted(stream.close()) == list(range(1, 101))
    after = lab.agent_metrics(a)
    rows = after["pgvpn_rows_inserted_total"] - before["pgvpn_rows_inserted_total"]
    batches = after["pgvpn_insert_batches_total"] - before["pgvpn_insert_batches_total"]
    assert rows >= 100 and batches < 0.75 * rows, (rows, batches)
    assert lab.ping(a, b, count=3) and lab.ping(b, a, v6=True, count=3)


def test_cursor_commits_ride_on_replies_and_one_way_traffic_commits_alone(make_lab):
    """Ping replies carry the receiver's cursor in their batch; datagrams that nothing answers
    have it committed by the receiver within save_delay. Either way the cursor catches up."""
    lab = make_lab(peers=2)
    a, b = lab.peers
    by_sender, by_receiver = ('pgvpn_cursor_saves_total{by="sender"}',
                              'pgvpn_cursor_saves_total{by="receiver"}')
    before = lab.agent_metrics(b)
    assert lab.ping(a, b, count=10)
    after = lab.agent_metrics(b)
    carried = after[by_sender] - before[by_sender]
    alone = after[by_receiver] - before[by_receiver]
    assert carried >= 6 and carried > alone, (carried, alone)

    before = after
    stream = Stream(lab, a, b, port=7401)  # one way: the receiving side sends nothing back
    for n in range(1, 31):
        stream.send(n)
        time.sleep(0.03)
    stream.wait_count(30, timeout=10)
    assert sorted(stream.close()) == list(range(1, 31))

    def caught_up() -> None:
        behind = lab.psql("SELECT count(*) FROM pgvpn.cursor c JOIN pgvpn.link l "
                          "USING (src, dst) WHERE c.rx_seq <> l.tx_seq")
        assert behind == "0"

    eventually(caught_up, timeout=5)
    after = lab.agent_metrics(b)
    assert after[by_receiver] - before[by_receiver] >= 10
