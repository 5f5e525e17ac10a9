"""Hand-built IP packets for tests."""

from __future__ import annotations

import ipaddress
import struct


def ports(src: int, dst: int, rest: bytes = b"\0" * 4) -> bytes:
    """The start of a TCP/UDP header: the ports, then `rest`."""
    return struct.pack("!HH", src, dst) + rest


def ipv4(src: str, dst: str, protocol: int, payload: bytes, *, flags_offset: int = 0,
         options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 1, flags_offset,
                         64, protocol, 0, ipaddress.IPv4Address(src).packed,
                         ipaddress.IPv4Address(dst).packed)
    return header + options + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return header + payload


def ext(next_header: int, body: bytes = b"\0" * 6) -> bytes:
    """A hop-by-hop/routing/dest-opts header: length in 8-byte units beyond the first 8."""
    return struct.pack("!BB", next_header, (len(body) + 2) // 8 - 1) + body


def frag6(next_header: int, offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", next_header, 0, offset << 3 | more, 0x1234)
