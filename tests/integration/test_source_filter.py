"""Inbound source filtering: a receiver writes to its TUN only packets whose source address the
sending peer owns (the incoming half of AllowedIPs), whatever a peer puts into its rows.

peer1's agent is stopped and the test logs rows as peer1's login with `pgvpn.send_batch()`, as a
compromised peer host could: a forged row is one its own agent would never have sent.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pgvpn_agent import db, wire
from pgvpn_agent.config import Database
from pgvpn_agent.lab import Lab, LabPeer
from pgvpn_agent.sender import SEND_BATCH
from tests.integration.stream import SCRIPT, eventually

pytestmark = pytest.mark.integration

BAD_SOURCE = 'pgvpn_packets_dropped_total{reason="bad_source"}'
PORT = 5301
WARNING = "whose source address is not among their sender's addresses and routes"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp(src: str, dst: str, port: int, data: bytes) -> bytes:
    """A UDP datagram in an IPv4 or IPv6 packet, checksums right: what a kernel would accept."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(data)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 17, length)
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", length, 17)
    segment = struct.pack("!HHHH", 40000, port, length, 0) + data
    segment = segment[:6] + struct.pack("!H", checksum(pseudo + segment) or 0xFFFF) + segment[8:]
    if s.version == 6:
        return struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, s.packed, d.packed) + segment
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, 64, 17, 0,
                         s.packed, d.packed)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + segment


def datagram(n: int, src: str, dst: str) -> bytes:
    return udp(src, dst, PORT, f"{n} ".encode() + b"." * 64)


def send_as(conn: db.Conn, me: int, dst: int, packets: list[bytes]) -> None:
    """Log `packets` on the link me -> dst through send_batch(), the way the sender does."""
    row = conn.execute("SELECT tx_seq FROM pgvpn.link WHERE src = %s AND dst = %s",
                       (me, dst)).fetchone()
    assert row is not None
    first = int(row[0]) + 1
    n = len(packets)
    # the source and destination addresses, as binary inet
    src, dst_addr = zip(*((wire.INET4 + p[12:16], wire.INET4 + p[16:20]) if p[0] >> 4 == 4
                          else (wire.INET6 + p[8:24], wire.INET6 + p[24:40]) for p in packets),
                        strict=True)
    conn.execute(SEND_BATCH, (
        me, True, wire.fixed("int2", [dst]), wire.fixed("int8", [first]),
        wire.fixed("int8", [first + n - 1]), wire.fixed("int2", [dst] * n),
        wire.fixed("int8", list(range(first, first + n))), wire.timestamps([time.time()] * n),
        wire.fixed("int2", [p[0] >> 4 for p in packets]),
        wire.blobs("inet", list(src)), wire.blobs("inet", list(dst_addr)),
        wire.fixed("int2", [17] * n),
        wire.nullable_int4([40000] * n), wire.nullable_int4([PORT] * n),
        wire.fixed("int4", [len(p) for p in packets]), wire.booleans([False] * n),
        wire.blobs("bytea", packets), wire.blobs("bytea", [None] * n),
        wire.fixed("int2", []), wire.fixed("int8", [])))


@contextmanager
def listening(peer: LabPeer) -> Iterator[list[int]]:
    """The numbers of the datagrams that reach PORT in the peer's namespace (IPv4 and IPv6)."""
    proc = subprocess.Popen(["ip", "netns", "exec", peer.netns, sys.executable, SCRIPT, "recv",
                             str(PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    received: list[int] = []
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            received.append(int(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield received
    finally:
        proc.stdin.close()
        proc.wait(10)
        reader.join(10)


def test_receiver_drops_packets_from_sources_the_sender_does_not_own(make_lab):
    lab: Lab = make_lab(peers=3)
    peer1, peer2, peer3 = lab.peers
    ids = {k: int(v) for k, v in (r.split("=") for r in lab.psql(
        "SELECT name || '=' || id FROM pgvpn.peer").split())}
    lab.stop_agent(peer1)  # the only writer of its links is now this test
    log_start = Path(peer2.log).stat().st_size
    with listening(peer2) as received, \
            db.connect(Database(dsn=lab.dsn("pgvpn_peer1")), "attacker") as conn:
        for round_, (mine, theirs, outside, dst) in enumerate([
            (peer1.ipv4, peer3.ipv4, "192.0.2.1", peer2.ipv4),
            (peer1.ipv6, peer3.ipv6, "2001:db8::1", peer2.ipv6),
        ], start=1):
            before = lab.agent_metrics(peer2)[BAD_SOURCE]
            n = 10 * round_
            # peer3's address, then one no peer owns, then peer1's own: only the last is peer1's
            send_as(conn, ids["peer1"], ids["peer2"], [
                datagram(n + 1, theirs, dst), datagram(n + 2, outside, dst),
                datagram(n + 3, mine, dst)])

            def legit_only(n: int = n) -> None:
                assert n + 3 in received, received
            eventually(legit_only)
            time.sleep(0.5)  # the forged ones were logged first: nothing may trail the legit one
            assert received == [13, 23][:round_], received

            def counted(before: float = before) -> None:
                assert lab.agent_metrics(peer2)[BAD_SOURCE] == before + 2
            eventually(counted)
    # one warning per fetched page, naming the sender and the count, not one per packet
    log = Path(peer2.log).read_bytes()[log_start:].decode(errors="replace")
    warnings = [line for line in log.splitlines() if WARNING in line]
    assert len(warnings) == 2, log
    assert all("2 from peer1" in line for line in warnings), warnings
    assert lab.ping(peer3, peer2) and lab.ping(peer3, peer2, v6=True)  # the receiver lives on
