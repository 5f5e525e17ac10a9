"""What a receiver accepts as a stored offload header, and what a row stands for on the wire."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgvpn_agent import tun, wire
from tests.packets import ipv4, ipv6

TCP4 = ipv4("10.0.0.1", "10.0.0.2", 6, bytes(20) + bytes(10_000))
TCP6 = ipv6("fd00::1", "fd00::2", 6, bytes(20) + bytes(10_000))
UDP4 = ipv4("10.0.0.1", "10.0.0.2", 17, bytes(8) + b"x" * 100)


def header(flags=0, gso=tun.GSO_NONE, hdr_len=0, gso_size=0, start=0, offset=0) -> bytes:
    return tun.VNET.pack(flags, gso, hdr_len, gso_size, start, offset)


# what TUN hands out with TSO and checksum offload on
TSO4 = header(tun.NEEDS_CSUM, tun.GSO_TCPV4, 40, 1448, 20, 16)
TSO6 = header(tun.NEEDS_CSUM, tun.GSO_TCPV6, 60, 1428, 40, 16)


@pytest.mark.parametrize(("offload", "packet", "version"), [
    (TSO4, TCP4, 4),
    (TSO6, TCP6, 6),
    (header(tun.NEEDS_CSUM, start=20, offset=6), UDP4, 4),  # a UDP checksum left partial
    (header(tun.NEEDS_CSUM, start=20, offset=16), TCP4, 4),
    (tun.NO_OFFLOAD, UDP4, 4),
])
def test_what_the_kernel_hands_out_is_accepted(offload, packet, version):
    assert tun.check_offload(offload, packet, version)


@pytest.mark.parametrize(("offload", "packet", "version"), [
    (TSO4, TCP6, 6),  # TCPv4 segmentation of an IPv6 packet
    (TSO6, TCP4, 4),
    (header(tun.NEEDS_CSUM, 3, 28, 1400, 20, 6), UDP4, 4),  # UFO: never enabled
    (header(tun.NEEDS_CSUM, tun.GSO_TCPV4 | 0x80, 40, 1448, 20, 16), TCP4, 4),  # ECN: not either
    (header(0, tun.GSO_TCPV4, 40, 1448, 20, 16), TCP4, 4),  # TSO without a partial checksum
    (header(tun.NEEDS_CSUM, tun.GSO_TCPV4, 40, 0, 20, 16), TCP4, 4),  # segments of 0 bytes
    (header(tun.NEEDS_CSUM, tun.GSO_TCPV4, 40, 20_000, 20, 16), TCP4, 4),  # one "segment"
    (header(tun.NEEDS_CSUM, start=len(UDP4), offset=6), UDP4, 4),  # checksum past the end
    (header(tun.NEEDS_CSUM, start=4, offset=6), UDP4, 4),  # inside the IP header
    (header(tun.NEEDS_CSUM, start=20, offset=2), UDP4, 4),  # not a checksum field
    (header(0x80), UDP4, 4),  # unknown flag
    (header(gso_size=1400), UDP4, 4),  # a size without a type
    (header(hdr_len=60_000), UDP4, 4),
    (TSO4[:-1], TCP4, 4),
])
def test_anything_else_is_refused(offload, packet, version):
    assert not tun.check_offload(offload, packet, version)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=12), st.binary(max_size=64), st.integers(0, 15))
def test_check_offload_never_raises(offload, packet, version):
    tun.check_offload(offload, packet, version)


def test_segments():
    assert tun.segments(None, 1500) == 1
    assert tun.segments(tun.NO_OFFLOAD, 1500) == 1
    assert tun.segments(TSO4, len(TCP4)) == -(-(len(TCP4) - 40) // 1448)
    assert tun.segments(header(tun.NEEDS_CSUM, start=20, offset=16), 9000) == 1


def test_a_column_with_nulls():
    array = wire.blobs("bytea", [b"ab", None, b""])
    assert array.oid == wire.ARRAY_OIDS["bytea"]
    # header: ndim 1, has nulls, element oid, 3 elements from 1; then length-prefixed elements
    assert array.data[4:8] == b"\0\0\0\1"
    assert array.data[20:] == b"\0\0\0\2ab" + b"\xff\xff\xff\xff" + b"\0\0\0\0"
