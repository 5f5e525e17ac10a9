"""Which peer a packet goes to, and which peer may have sent it: longest-prefix match on its
destination (outgoing) or its source (incoming), like WireGuard's AllowedIPs.

Ambiguity is refused when the table is built, so the per-packet lookup never has to choose
between peers and the operator learns about a conflict at start, not from lost traffic.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Destinations repeat (a flow is many packets), so remembering answers skips the prefix walk.
# Cleared when full so traffic to many addresses cannot grow it without bound.
_CACHE_SIZE = 4096
# What the cache answers for an unknown destination: .get with a default costs a fifth of a
# KeyError on a miss. A peer named "" would merely never be served from the cache.
_UNCACHED = ""
# Drop reasons of SourceFilter.check, as metrics.DROP_REASONS names them.
BAD_SOURCE = "bad_source"
MALFORMED = "malformed"


class RoutingError(ValueError):
    """The routes cannot form an unambiguous table; the message lists every offending entry."""


class RouteTable:
    """Immutable after construction; `lookup` takes raw 4- or 16-byte destinations from packets."""

    def __init__(self, routes: Iterable[tuple[str, str]]) -> None:
        owners: dict[Network, str] = {}
        problems: list[str] = []
        for text, peer in routes:
            try:
                net = _network(text)
            except RoutingError as exc:
                problems.append(f"{exc} (peer {peer!r})")
                continue
            owner = owners.setdefault(net, peer)
            if owner != peer:
                problems.append(f"{net} is claimed by both {owner!r} and {peer!r}; a prefix "
                                "must belong to one peer (give one of them a longer prefix)")
        if problems:
            raise RoutingError("; ".join(problems))
        self._prefixes = sorted(owners.items(), key=lambda item: (
            item[0].version, int(item[0].network_address), item[0].prefixlen))
        # Per address length: (mask, {network: peer}) for each prefix length, longest first.
        self._tables: dict[int, list[tuple[int, dict[int, str]]]] = {4: [], 16: []}
        by_length: dict[tuple[int, int], dict[int, str]] = {}
        for net, peer in self._prefixes:
            by_length.setdefault((net.max_prefixlen, net.prefixlen), {})[
                int(net.network_address)] = peer
        for (bits, prefixlen), nets in sorted(by_length.items(), key=lambda kv: -kv[0][1]):
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen)
            self._tables[bits // 8].append((mask, nets))
        self._cache: dict[bytes, str | None] = {}

    @property
    def prefixes(self) -> list[tuple[Network, str]]:
        """Each distinct prefix with its peer, IPv4 before IPv6, in address order."""
        return list(self._prefixes)

    def lookup(self, dst_raw: bytes) -> str | None:
        """The peer owning the longest prefix containing `dst_raw`, or None if none does."""
        peer = self._cache.get(dst_raw, _UNCACHED)
        if peer != _UNCACHED:
            return peer
        tables = self._tables.get(len(dst_raw))
        if tables is None:
            raise ValueError(f"a destination is 4 or 16 bytes, not {len(dst_raw)}")
        address = int.from_bytes(dst_raw)
        peer = None
        for mask, nets in tables:
            peer = nets.get(address & mask)
            if peer is not None:
                break
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[dst_raw] = peer
        return peer


class SourceFilter:
    """The incoming half of AllowedIPs (WireGuard's cryptokey routing): a peer may send only
    packets whose source address it owns, the longest prefix containing it being one of its own.

    Built over every configured peer, this agent included: a source inside a more specific
    prefix of another peer (or of this agent) is not the sender's, even when a shorter prefix
    of the sender, such as a default route, contains it too.
    """

    def __init__(self, routes: Iterable[tuple[str, str]]) -> None:
        self.table = RouteTable(routes)
        self._lookup = self.table.lookup  # cached per source address

    def check(self, sender: str, packet: bytes) -> str | None:
        """None if `sender` may have sent `packet` (an IP packet, no offload header), else why
        not: "malformed" (not IPv4 or IPv6, or too short to hold its source address) or
        "bad_source" (no prefix of the sender's is the longest one containing the source)."""
        if not packet:
            return MALFORMED
        version = packet[0] >> 4
        if version == 4:
            if len(packet) < 16:
                return MALFORMED
            source = packet[12:16]
        elif version == 6:
            if len(packet) < 24:
                return MALFORMED
            source = packet[8:24]
        else:
            return MALFORMED
        return None if self._lookup(source) == sender else BAD_SOURCE


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RoutingError(f"{text!r} is not an IP address or prefix") from None
    raise RoutingError(f"{text!r} has host bits set; did you mean {network}?")
