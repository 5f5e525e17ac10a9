"""Joining a flow's back-to-back TCP bursts: what a receiving stack would take as one stream of
bytes is joined, with a checksum a NIC or the kernel completes correctly; nothing else is."""

from __future__ import annotations

import random
import struct

import pytest

from pgvpn_agent import tun
from pgvpn_agent.bursts import join
from tests.packets import ipv4, ipv6

A4, B4, C4 = "10.77.0.1", "10.77.0.2", "10.77.0.3"
A6, B6 = "fd77::1", "fd77::2"
MSS = 1448
ACK, PSH, FIN, SYN = 0x10, 0x08, 0x01, 0x02


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _pseudo(packet: bytes, tcp_len: int) -> int:
    if packet[0] >> 4 == 4:
        return _sum16(packet[12:20] + struct.pack("!HH", 6, tcp_len))
    return _sum16(packet[8:40] + struct.pack("!IxxxB", tcp_len, 6))


def burst(seq: int, size: int, *, src: str = A4, dst: str = B4, sport: int = 5001,
          flags: int = ACK, ack: int = 7, window: int = 500, ts: tuple[int, int] | None = (100, 9),
          mss: int = MSS, ttl: int = 64, options: bytes | None = None) -> bytes:
    """A burst as TUN hands it out with TSO on: partial checksum, segmented at mss if longer."""
    opts = options if options is not None else (
        b"\x01\x01\x08\x0a" + struct.pack("!II", *ts) if ts else b"")
    doff = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, seq, ack, doff << 4, flags, window, 0, 0) + opts
    body = bytes((seq + i) & 0xFF for i in range(size))
    v6 = ":" in src
    if v6:
        packet = ipv6(src, dst, 6, tcp + body)
        ihl, gso = 40, tun.GSO_TCPV6
    else:
        packet = bytearray(ipv4(src, dst, 6, tcp + body))
        packet[8] = ttl
        struct.pack_into("!H", packet, 10, 0xFFFF - _sum16(bytes(packet[:20])))
        packet = bytes(packet)
        ihl, gso = 20, tun.GSO_TCPV4
    packet = bytearray(packet)
    struct.pack_into("!H", packet, ihl + 16, _pseudo(bytes(packet), len(tcp) + size))
    gso_type, gso_size = (gso, mss) if size > mss else (tun.GSO_NONE, 0)
    vnet = tun.VNET.pack(tun.NEEDS_CSUM, gso_type, ihl + len(tcp), gso_size, ihl, 16)
    return vnet + bytes(packet)


def parts(raw: bytes) -> dict[str, object]:
    """What a receiver sees of a packet, its checksum completed as a NIC would."""
    flags, gso_type, _, gso_size, csum_start, csum_offset = tun.VNET.unpack_from(raw)
    p = raw[tun.VNET_SIZE:]
    v6 = p[0] >> 4 == 6
    ihl = 40 if v6 else 20
    total = 40 + struct.unpack_from("!H", p, 4)[0] if v6 else struct.unpack_from("!H", p, 2)[0]
    assert total == len(p)
    if not v6:
        assert _sum16(p[:20]) == 0xFFFF, "IPv4 header checksum"
    assert flags == tun.NEEDS_CSUM and csum_start == ihl and csum_offset == 16
    doff = (p[ihl + 12] >> 4) * 4
    # the NIC: checksum over the TCP segment from csum_start, seeded with the partial sum
    done = bytearray(p)
    struct.pack_into("!H", done, ihl + 16, 0xFFFF - _sum16(bytes(done[ihl:])))
    assert (_pseudo(bytes(done), total - ihl) + _sum16(bytes(done[ihl:]))) % 0xFFFF == 0, \
        "TCP checksum"
    seq, ack = struct.unpack_from("!II", p, ihl + 4)
    return {"seq": seq, "ack": ack, "flags": p[ihl + 13],
            "window": struct.unpack_from("!H", p, ihl + 14)[0], "options": p[ihl + 20:ihl + doff],
            "payload": p[ihl + doff:], "gso": (gso_type, gso_size)}


def run(*bursts: bytes) -> tuple[list[bytes], int]:
    out, joined = join([(float(i), b) for i, b in enumerate(bursts)])
    return [raw for _, raw in out], joined


@pytest.mark.parametrize("src,dst,gso", [(A4, B4, tun.GSO_TCPV4), (A6, B6, tun.GSO_TCPV6)])
def test_back_to_back_bursts_of_a_flow_become_one(src, dst, gso):
    sizes = [4 * MSS, 2 * MSS, MSS, 3 * MSS + 100]
    seq, bursts = 1000, []
    for i, size in enumerate(sizes):
        bursts.append(burst(seq, size, src=src, dst=dst, ack=7 + i, window=500 + i,
                            ts=(100 + i, 9 + i), flags=ACK | (PSH if i == 3 else 0)))
        seq += size
    (out,), joined = run(*bursts)
    assert joined == 3
    got = parts(out)
    assert got["seq"] == 1000 and got["ack"] == 10 and got["window"] == 503
    assert got["flags"] == ACK | PSH
    assert got["options"] == b"\x01\x01\x08\x0a" + struct.pack("!II", 103, 12)
    assert got["payload"] == b"".join(parts(b)["payload"] for b in bursts)  # type: ignore[misc]
    assert got["gso"] == (gso, MSS)
    assert tun.check_offload(out[:tun.VNET_SIZE], out[tun.VNET_SIZE:], 6 if ":" in src else 4)


def test_flows_are_joined_apart_each_at_its_first_bursts_place():
    x1, y1 = burst(0, 2 * MSS), burst(0, 2 * MSS, sport=6000)
    x2, y2 = burst(2 * MSS, MSS), burst(2 * MSS, MSS, sport=6000)
    other = burst(0, 100, dst=C4)
    out, joined = run(x1, y1, other, x2, y2)
    assert joined == 2 and len(out) == 3
    assert parts(out[0])["payload"] == parts(x1)["payload"] + parts(x2)["payload"]  # type: ignore[operator]
    assert parts(out[1])["payload"] == parts(y1)["payload"] + parts(y2)["payload"]  # type: ignore[operator]
    assert out[2] == other


@pytest.mark.parametrize("second", [
    pytest.param(burst(2 * MSS + 1, MSS), id="a gap in the sequence"),
    pytest.param(burst(0, MSS), id="a retransmission"),
    pytest.param(burst(2 * MSS, MSS, flags=ACK | FIN), id="FIN"),
    pytest.param(burst(2 * MSS, MSS, ttl=63), id="another TTL"),
    pytest.param(burst(2 * MSS, MSS, options=b"\x01\x01\x05\x0a" + bytes(8)), id="SACK"),
    pytest.param(burst(2 * MSS, 4 * 1000, mss=1000), id="another segment size"),
])
def test_what_a_stack_would_not_take_as_the_same_stream_stays_apart(second):
    first = burst(0, 2 * MSS)
    out, joined = run(first, second)
    assert joined == 0 and out == [first, second]


def test_nothing_follows_a_short_segment():
    short = burst(0, MSS + 10)  # its last segment is not full
    nxt = burst(MSS + 10, MSS)
    assert run(short, nxt) == ([short, nxt], 0)


def test_a_push_in_the_middle_is_kept_on_the_joined_packet():
    """Linux marks most TSO bursts PSH; the joined bytes reach the receiver at once anyway."""
    (out,), joined = run(burst(0, 2 * MSS, flags=ACK | PSH), burst(2 * MSS, MSS))
    assert joined == 1 and parts(out)["flags"] == ACK | PSH


def test_a_packet_of_the_flow_in_between_closes_it():
    """A pure ACK of the same flow between two bursts: the bytes after it stay after it."""
    a1, pure, a2 = burst(0, 2 * MSS), burst(2 * MSS, 0), burst(2 * MSS, MSS)
    out, joined = run(a1, pure, a2)
    assert joined == 0 and out == [a1, pure, a2]


def test_joined_packets_stay_within_64_kb():
    bursts = [burst(i * 20 * MSS, 20 * MSS) for i in range(4)]
    out, joined = run(*bursts)
    assert joined == 2 and len(out) == 2
    assert all(len(raw) - tun.VNET_SIZE <= 65535 for raw in out)
    assert b"".join(parts(r)["payload"] for r in out) == b"".join(  # type: ignore[misc]
        parts(b)["payload"] for b in bursts)  # type: ignore[misc]


def test_ip_options_fragments_and_full_checksums_are_left_alone():
    plain = burst(0, 2 * MSS)
    nxt = burst(2 * MSS, MSS)
    no_partial = tun.VNET.pack(0, 0, 0, 0, 0, 0) + nxt[tun.VNET_SIZE:]
    frag = bytearray(nxt)
    frag[tun.VNET_SIZE + 6] |= 0x20  # more fragments
    for second in (no_partial, bytes(frag)):
        assert run(plain, second) == ([plain, second], 0)


def test_garbage_passes_through_untouched():
    junk = [b"", bytes(tun.VNET_SIZE), bytes(tun.VNET_SIZE) + b"\x45" + bytes(50),
            bytes(tun.VNET_SIZE) + b"\x60" + bytes(70), b"\xff" * 200]
    assert run(*junk) == (junk, 0)


def test_mutated_bursts_never_break_it_and_joined_ones_stay_valid():
    """Hostile or odd packets from the TUN (bytes flipped anywhere in headers and offload
    header): join() never raises, passes through what it does not join untouched, and whatever
    it joins is a valid burst holding the joined payloads in order."""
    rng = random.Random(17)
    for _ in range(400):
        seq, batch = rng.randrange(1 << 32), []
        for i in range(rng.randint(1, 8)):
            size = rng.choice([MSS, 2 * MSS, 3 * MSS, MSS + 7, 0, 40])
            raw = bytearray(burst(seq & 0xFFFFFFFF, size, sport=5001 + rng.randint(0, 1),
                                  ts=(100 + i, 9)))
            seq += size
            for _ in range(rng.choice([0, 0, 1, 2])):
                raw[rng.randrange(min(len(raw), tun.VNET_SIZE + 60))] = rng.randrange(256)
            batch.append(bytes(raw))
        out, joined = run(*batch)
        assert len(out) == len(batch) - joined
        for raw in out:
            if raw not in batch:
                assert parts(raw)["payload"]  # a valid joined burst
