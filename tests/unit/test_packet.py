"""parse(): hand-built packets with known fields, and fuzzing for the never-crash promise."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgvpn_agent.packet import MAX_PACKET, Header, MalformedPacket, parse
from tests.packets import ext, frag6, ipv4, ipv6, ports

TCP, UDP, ICMP, ICMPV6, ESP, NO_NEXT = 6, 17, 1, 58, 50, 59
HOP_BY_HOP, FRAGMENT, DEST_OPTS, AH = 0, 44, 60, 51
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def reason(packet: bytes) -> str:
    with pytest.raises(MalformedPacket) as info:
        parse(packet)
    return info.value.reason


def test_ipv4_udp() -> None:
    packet = ipv4("10.0.0.1", "10.0.0.2", UDP, ports(5353, 53) + b"query")
    assert parse(packet) == Header(version=4, src="10.0.0.1", dst="10.0.0.2",
                                   dst_raw=bytes([10, 0, 0, 2]), protocol=UDP, src_port=5353,
                                   dst_port=53, length=len(packet), fragment=False)


def test_ipv4_tcp_after_options() -> None:
    packet = ipv4("192.0.2.1", "198.51.100.7", TCP, ports(40000, 443, b"\0" * 16),
                  options=b"\x01\x01\x01\x00")
    h = parse(packet)
    assert (h.protocol, h.src_port, h.dst_port) == (TCP, 40000, 443)
    assert h.length == len(packet) == 44


def test_ipv4_icmp_has_no_ports() -> None:
    h = parse(ipv4("10.0.0.1", "10.0.0.2", ICMP, b"\x08\0\0\0\0\1\0\1"))
    assert (h.protocol, h.src_port, h.dst_port, h.fragment) == (ICMP, None, None, False)


def test_ipv4_truncated_l4_header_is_still_a_packet() -> None:
    h = parse(ipv4("10.0.0.1", "10.0.0.2", TCP, b"\x01\x02\x03"))
    assert (h.protocol, h.src_port, h.dst_port) == (TCP, None, None)


def test_ipv4_first_fragment_has_ports() -> None:
    h = parse(ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1000, 2000), flags_offset=0x2000))
    assert (h.fragment, h.src_port, h.dst_port) == (True, 1000, 2000)


def test_ipv4_later_fragment_has_no_ports() -> None:
    # Payload bytes that would read as ports 1000/2000 if parsed as a UDP header.
    h = parse(ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1000, 2000), flags_offset=185))
    assert (h.fragment, h.protocol, h.src_port, h.dst_port) == (True, UDP, None, None)


def test_ipv4_last_fragment_is_a_fragment() -> None:
    assert parse(ipv4("10.0.0.1", "10.0.0.2", UDP, b"tail", flags_offset=370)).fragment


def test_ipv4_dont_fragment_flag_is_not_a_fragment() -> None:
    assert not parse(ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1, 2), flags_offset=0x4000)).fragment


def test_ipv6_udp() -> None:
    packet = ipv6("fd00::1", "fd00::2", UDP, ports(5353, 53))
    assert parse(packet) == Header(version=6, src="fd00::1", dst="fd00::2",
                                   dst_raw=ipaddress.IPv6Address("fd00::2").packed,
                                   protocol=UDP, src_port=5353, dst_port=53, length=48,
                                   fragment=False)


def test_ipv6_icmpv6_has_no_ports() -> None:
    h = parse(ipv6("fd00::1", "fd00::2", ICMPV6, b"\x80\0\0\0\0\1\0\1"))
    assert (h.protocol, h.src_port, h.dst_port) == (ICMPV6, None, None)


def test_ipv6_hop_by_hop_and_first_fragment() -> None:
    payload = ext(FRAGMENT) + frag6(TCP, 0, more=True) + ports(40000, 22, b"\0" * 16)
    h = parse(ipv6("fd00::1", "fd00::2", HOP_BY_HOP, payload))
    assert (h.protocol, h.src_port, h.dst_port, h.fragment) == (TCP, 40000, 22, True)


def test_ipv6_later_fragment_has_no_ports() -> None:
    payload = ext(FRAGMENT) + frag6(UDP, 1448 // 8, more=False) + ports(1000, 2000)
    h = parse(ipv6("fd00::1", "fd00::2", HOP_BY_HOP, payload))
    assert (h.protocol, h.src_port, h.dst_port, h.fragment) == (UDP, None, None, True)


def test_ipv6_long_dest_opts_and_ah_are_skipped() -> None:
    ah = struct.pack("!BB", UDP, 4) + b"\0" * 22  # AH length is in 4-byte units minus 2
    payload = ext(AH, b"\0" * 14) + ah + ports(7, 9)
    h = parse(ipv6("fd00::1", "fd00::2", DEST_OPTS, payload))
    assert (h.protocol, h.src_port, h.dst_port) == (UDP, 7, 9)


@pytest.mark.parametrize("next_header", [ESP, NO_NEXT])
def test_ipv6_walk_stops_at_esp_and_no_next_header(next_header: int) -> None:
    h = parse(ipv6("fd00::1", "fd00::2", HOP_BY_HOP, ext(next_header) + ports(1, 2)))
    assert (h.protocol, h.src_port, h.dst_port) == (next_header, None, None)


@pytest.mark.parametrize(("packet", "expected"), [
    (b"", "empty"),
    (b"\x00" * 40, "bad_version"),
    (b"\x55" * 40, "bad_version"),
    (b"\x45\x00\x00\x13" + b"\0" * 15, "truncated_header"),
    (b"\x60" + b"\0" * 38, "truncated_header"),
    (ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1, 2))[:-1], "length_mismatch"),
    (ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1, 2)) + b"\0", "length_mismatch"),
    (ipv6("fd00::1", "fd00::2", UDP, ports(1, 2))[:-1], "length_mismatch"),
    (b"\x44" + ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1, 2))[1:], "bad_ihl"),
    (b"\x4f" + ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1, 2))[1:], "bad_ihl"),
    (ipv6("fd00::1", "fd00::2", HOP_BY_HOP, b"\0" * 7), "truncated_ext_header"),
    (ipv6("fd00::1", "fd00::2", HOP_BY_HOP, b"\0\x01" + b"\0" * 6), "truncated_ext_header"),
    (ipv6("fd00::1", "fd00::2", HOP_BY_HOP, ext(FRAGMENT)), "truncated_ext_header"),
    (ipv6("fd00::1", "fd00::2", HOP_BY_HOP, b"\0" * (MAX_PACKET - 39)), "too_large"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_malformed(packet: bytes, expected: str) -> None:
    assert reason(packet) == expected


def test_jumbogram_is_refused() -> None:
    """The jumbo option is only legal above 65535 bytes, which is more than TUN can hand us."""
    jumbo = struct.pack("!BBBBI", UDP, 0, 0xC2, 4, 16)
    packet = bytearray(ipv6("fd00::1", "fd00::2", HOP_BY_HOP, jumbo + ports(1, 2)))
    packet[4:6] = b"\0\0"
    assert reason(bytes(packet)) == "length_mismatch"


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_malformed(data: bytes) -> None:
    try:
        assert isinstance(parse(data), Header)
    except MalformedPacket as exc:
        assert exc.reason


@settings(max_examples=2000, deadline=None)
@given(version=st.sampled_from([4, 6]), body=st.binary(max_size=300),
       next_header=st.sampled_from([HOP_BY_HOP, 43, FRAGMENT, AH, DEST_OPTS, UDP, ESP]))
def test_plausible_headers_parse_or_raise_malformed(version: int, body: bytes,
                                                    next_header: int) -> None:
    """Random bytes behind a valid version and length field reach the option and extension walk."""
    data = bytearray(body.ljust(40, b"\0"))
    if version == 4:
        data[0] = 0x40 | data[0] & 0x0F
        data[2:4] = len(data).to_bytes(2)
    else:
        data[0] = 0x60
        data[4:6] = (len(data) - 40).to_bytes(2)
        data[6] = next_header
    try:
        h = parse(bytes(data))
    except MalformedPacket as exc:
        assert exc.reason in {"bad_ihl", "truncated_ext_header"}
    else:
        assert (h.version, h.length) == (version, len(data))


@settings(max_examples=300, deadline=None)
@given(addresses=st.one_of(st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
                          st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6))),
       src_port=st.integers(0, 65535), dst_port=st.integers(0, 65535),
       payload=st.binary(max_size=1400))
def test_udp_round_trip(addresses: tuple[Address, Address], src_port: int, dst_port: int,
                        payload: bytes) -> None:
    src, dst = addresses
    build = ipv4 if src.version == 4 else ipv6
    packet = build(str(src), str(dst), UDP, ports(src_port, dst_port) + payload)
    h = parse(packet)
    # Compare addresses, not text: inet_ntop and ipaddress spell a few IPv6 forms differently.
    assert (ipaddress.ip_address(h.src), ipaddress.ip_address(h.dst)) == (src, dst)
    assert h == Header(version=src.version, src=h.src, dst=h.dst, dst_raw=dst.packed,
                       protocol=UDP, src_port=src_port, dst_port=dst_port, length=len(packet),
                       fragment=False)
