"""Back-to-back TCP bursts of one flow in a batch become one row (receive offload, LRO-style).

With several flows, each flow's TCP sends smaller TSO bursts (the kernel sizes them to about a
millisecond of its pacing rate): eight flows gave rows of 3-6 KB against 35-64 KB for one, and a
row costs about as much again in each agent and each backend whatever its size. A batch holds
about ten consecutive bursts of each flow; joined, they are one row, one TUN write and one
segment for the receiving stack, like a NIC's large receive offload.

Only what the receiving stack would take as one stream of bytes is joined: the same flow, the
next sequence number, ACK segments of one size (a PSH is kept: the joined bytes arrive at
once), no IP options or extension headers, the TCP options differing at most in the
timestamps' values. The joined packet keeps the
first burst's IP header and sequence number and takes the last one's acknowledgment, window,
flags and timestamps (what a receiver acts on), as FreeBSD's tcp_lro does.
"""

from __future__ import annotations

import struct

from pgvpn_agent import tun
from pgvpn_agent.payload import Captured

_VNET = tun.VNET
_V = tun.VNET_SIZE
_ACK, _PSH = 0x10, 0x08
# NOP NOP TIMESTAMP(10): the one option layout whose values may differ between joined bursts
_TS_PREFIX = b"\x01\x01\x08\x0a"
MAX_PACKET = 65535
TCP = 6


class _Open:
    """A flow's joined packet in the making."""

    __slots__ = (
        "full",
        "head",
        "ihl",
        "index",
        "ipv6",
        "last_tcp",
        "mss",
        "next_seq",
        "parts",
        "push",
        "segs",
        "sent_at",
        "size",
    )

    def __init__(self, index: int, sent_at: float, head: bytes, payload: memoryview, mss: int,
                 next_seq: int, tcp: bytes, ipv6: bool, ihl: int) -> None:
        self.index = index
        self.sent_at = sent_at
        self.head = head          # IP header + TCP header of the first burst
        self.parts = [payload]
        self.size = len(payload)
        self.mss = mss
        self.next_seq = next_seq
        self.last_tcp = tcp       # TCP header of the last burst joined
        self.full = len(payload) % mss == 0
        self.segs = 1
        self.push = tcp[13] & _PSH
        self.ipv6 = ipv6
        self.ihl = ihl


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum16(data: bytes) -> int:
    """One's complement sum of 16-bit words, unfolded (headers only: always an even length)."""
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _finish(o: _Open) -> bytes:
    """The joined packet behind its offload header."""
    ihl = o.ihl
    tcp = o.last_tcp
    thl = len(tcp)
    # ports and seq from the first burst, everything else from the last one
    tcp_hdr = o.head[ihl:ihl + 8] + tcp[8:16] + b"\0\0" + tcp[18:]
    tcp_len = thl + o.size
    if o.ipv6:
        ip = bytearray(o.head[:40])
        struct.pack_into("!H", ip, 4, tcp_len)
        pseudo = _sum16(bytes(ip[8:40])) + tcp_len + TCP
        gso = tun.GSO_TCPV6
    else:
        ip = bytearray(o.head[:ihl])
        struct.pack_into("!H", ip, 2, ihl + tcp_len)
        struct.pack_into("!H", ip, 10, 0)
        struct.pack_into("!H", ip, 10, 0xFFFF - _fold(_sum16(bytes(ip))))
        pseudo = _sum16(bytes(ip[12:20])) + tcp_len + TCP
        gso = tun.GSO_TCPV4
    tcp_b = bytearray(tcp_hdr)
    tcp_b[13] |= o.push
    struct.pack_into("!H", tcp_b, 16, _fold(pseudo))
    header = bytes(ip) + bytes(tcp_b)
    vnet = _VNET.pack(tun.NEEDS_CSUM, gso, len(header), o.mss, len(ip), 16)
    return vnet + header + b"".join(o.parts)


def join(batch: list[Captured]) -> tuple[list[Captured], int]:
    """The batch with each flow's joinable bursts joined, in the order of each flow's first
    burst; and how many packets were joined into others."""
    out: list[Captured | None] = []
    flows: dict[bytes, _Open] = {}
    joined = 0
    for sent_at, raw in batch:
        parsed = _parse(raw)
        if parsed is None:
            key = _flow_key(raw)
            if key is not None and key in flows:
                _close(out, flows.pop(key))
            out.append((sent_at, raw))
            continue
        key, ipv6, ihl, ip_head, tcp, payload, mss, seq = parsed
        o = flows.get(key)
        if (o is not None and seq == o.next_seq and o.full and mss == o.mss
                and o.segs < 64 and o.ihl + len(tcp) + o.size + len(payload) <= MAX_PACKET
                and _same_shape(o, ip_head, tcp)):
            o.parts.append(payload)
            o.size += len(payload)
            o.next_seq = (seq + len(payload)) & 0xFFFFFFFF
            o.last_tcp = tcp
            o.full = len(payload) % mss == 0
            o.segs += 1
            o.push |= tcp[13] & _PSH
            joined += 1
            continue
        if o is not None:
            _close(out, o)
        flows[key] = _Open(len(out), sent_at, ip_head + tcp, payload, mss,
                           (seq + len(payload)) & 0xFFFFFFFF, tcp, ipv6, ihl)
        out.append((sent_at, raw))
    for o in flows.values():
        _close(out, o)
    return [c for c in out if c is not None], joined


def _close(out: list[Captured | None], o: _Open) -> None:
    if o.segs > 1:
        out[o.index] = (o.sent_at, _finish(o))


def _same_shape(o: _Open, ip_head: bytes, tcp: bytes) -> bool:
    first = o.head
    if o.ipv6:
        # version, traffic class, flow label; next header and hop limit
        if ip_head[:4] != first[:4] or ip_head[6:8] != first[6:8]:
            return False
    elif (ip_head[1] != first[1] or ip_head[8] != first[8]
          or (ip_head[6] ^ first[6]) & 0x40):
        return False  # TOS, TTL, DF
    last = o.last_tcp
    if len(tcp) != len(last) or tcp[13] & ~_PSH != _ACK:
        return False
    opts, before = tcp[20:], last[20:]
    if opts == before:
        return True
    return len(opts) == 12 and opts[:4] == _TS_PREFIX and before[:4] == _TS_PREFIX


def _flow_key(raw: bytes) -> bytes | None:
    """The flow of a TCP packet that is not joined (it closes its flow's joining)."""
    if len(raw) < _V + 40:
        return None
    v = raw[_V] >> 4
    if v == 4 and raw[_V + 9] == TCP:
        ihl = (raw[_V] & 15) * 4
        return raw[_V + 12:_V + 20] + raw[_V + ihl:_V + ihl + 4]
    if v == 6 and len(raw) >= _V + 60 and raw[_V + 6] == TCP:
        return raw[_V + 8:_V + 40] + raw[_V + 40:_V + 44]
    return None


def _parse(raw: bytes) -> tuple[bytes, bool, int, bytes, bytes, memoryview, int, int] | None:
    """A TCP data burst that may be joined: (flow, ipv6, ip header length, ip header, tcp
    header, payload, segment size, sequence number), or None. The payload is a view: a burst
    left alone is not copied."""
    if len(raw) < _V + 40:
        return None
    flags, gso_type, _, gso_size, csum_start, csum_offset = _VNET.unpack_from(raw)
    p = memoryview(raw)[_V:]
    v = p[0] >> 4
    if v == 4:
        ihl = (p[0] & 15) * 4
        if ihl != 20 or p[9] != TCP or p[6] & 0x3F or p[7]:
            return None  # options, or a fragment
        total = (p[2] << 8) | p[3]
        gso_ok = tun.GSO_TCPV4
    elif v == 6:
        ihl = 40
        if len(p) < 60 or p[6] != TCP:
            return None
        total = 40 + ((p[4] << 8) | p[5])
        gso_ok = tun.GSO_TCPV6
    else:
        return None
    if total != len(p) or not flags & tun.NEEDS_CSUM or csum_start != ihl or csum_offset != 16:
        return None
    tcp_len = ((p[ihl + 12] >> 4) * 4)
    if tcp_len < 20 or ihl + tcp_len >= total:
        return None  # no payload: a pure ACK is never joined
    if p[ihl + 13] & ~_PSH != _ACK:
        return None
    payload_len = total - ihl - tcp_len
    if gso_type == gso_ok and gso_size:
        mss = gso_size
    elif gso_type == tun.GSO_NONE:
        mss = payload_len
    else:
        return None
    key = _flow_key(raw)
    assert key is not None
    seq = struct.unpack_from("!I", p, ihl + 4)[0]
    return (key, v == 6, ihl, bytes(p[:ihl]), bytes(p[ihl:ihl + tcp_len]), p[ihl + tcp_len:],
            mss, seq)
