"""RouteTable: longest-prefix match, and errors an operator can act on; SourceFilter: the
incoming half of AllowedIPs."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest

from pgvpn_agent.config import Peer, load
from pgvpn_agent.routing import RouteTable, RoutingError, SourceFilter
from tests.packets import ipv4, ipv6, ports


def raw(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


TABLE = RouteTable([
    ("0.0.0.0/0", "gateway"),
    ("10.0.0.0/8", "hub"),
    ("10.1.0.0/16", "branch"),
    ("10.1.2.3", "laptop"),
    ("fd00::/8", "hub"),
    ("fd00:1::/32", "branch"),
    ("fd00:1::5/128", "laptop"),
])


@pytest.mark.parametrize(("destination", "peer"), [
    ("10.1.2.3", "laptop"),
    ("10.1.2.4", "branch"),
    ("10.2.0.1", "hub"),
    ("192.0.2.1", "gateway"),
    ("fd00:1::5", "laptop"),
    ("fd00:1::6", "branch"),
    ("fd00:2::1", "hub"),
    ("2001:db8::1", None),
])
def test_longest_prefix_wins(destination: str, peer: str | None) -> None:
    assert TABLE.lookup(raw(destination)) == peer


def test_no_route() -> None:
    table = RouteTable([("10.0.0.2/32", "b"), ("fd00::/64", "b")])
    assert table.lookup(raw("10.0.0.3")) is None
    assert table.lookup(raw("fd00:0:0:1::1")) is None
    assert table.lookup(raw("::ffff:10.0.0.2")) is None  # families never mix
    assert RouteTable([]).lookup(raw("10.0.0.2")) is None


def test_same_prefix_twice_for_one_peer_is_deduplicated() -> None:
    table = RouteTable([("10.0.0.0/24", "b"), ("10.0.0.0/24", "b"),
                        ("10.0.0.0/255.255.255.0", "b")])
    assert table.prefixes == [(ipaddress.ip_network("10.0.0.0/24"), "b")]


def test_prefixes_are_sorted_v4_first() -> None:
    assert [str(net) for net, _ in TABLE.prefixes] == [
        "0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32",
        "fd00::/8", "fd00:1::/32", "fd00:1::5/128",
    ]


def test_same_prefix_for_two_peers_names_both() -> None:
    with pytest.raises(RoutingError) as info:
        RouteTable([("10.0.0.0/24", "alice"), ("10.0.0.0/8", "carol"), ("10.0.0.0/24", "bob")])
    message = str(info.value)
    assert "10.0.0.0/24" in message
    assert "'alice'" in message
    assert "'bob'" in message
    assert "carol" not in message


def test_host_bits_set_suggests_the_network() -> None:
    with pytest.raises(RoutingError, match=r"'10\.0\.0\.1/24' has host bits set; "
                                           r"did you mean 10\.0\.0\.0/24\?"):
        RouteTable([("10.0.0.1/24", "b")])
    with pytest.raises(RoutingError, match=r"did you mean fd00::/64\?"):
        RouteTable([("fd00::1/64", "b")])


@pytest.mark.parametrize("text", ["10.0.0.256/32", "fd00::/129", "bogus", "", "10.0.0.0/8 "])
def test_invalid_prefix_is_named(text: str) -> None:
    with pytest.raises(RoutingError) as info:
        RouteTable([(text, "peer-x")])
    assert f"{text!r} is not an IP address or prefix" in str(info.value)
    assert "'peer-x'" in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(RoutingError) as info:
        RouteTable([("nope", "a"), ("10.0.0.1/8", "b"), ("fd00::/8", "c"), ("fd00::/8", "d")])
    message = str(info.value)
    assert "'nope'" in message
    assert "did you mean 10.0.0.0/8" in message
    assert "'c' and 'd'" in message


def test_bad_destination_length() -> None:
    with pytest.raises(ValueError, match="4 or 16 bytes, not 5"):
        TABLE.lookup(b"\0" * 5)


def test_cache_matches_uncached_answers_across_clears() -> None:
    """Many more destinations than the cache holds, each looked up twice, must agree with a scan."""
    rng = random.Random(1)
    nets = [ipaddress.ip_network(text)
            for text in ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.128/25")]
    table = RouteTable((str(net), f"peer{i}") for i, net in enumerate(nets))

    def scan(address: ipaddress.IPv4Address) -> str | None:
        matches = [(net.prefixlen, i) for i, net in enumerate(nets) if address in net]
        return f"peer{max(matches)[1]}" if matches else None

    addresses = [ipaddress.IPv4Address(rng.choice([0x0A000000, 0x0A010000, 0x0A010200, 0])
                                       | rng.getrandbits(16)) for _ in range(10_000)]
    for address in addresses + addresses[::-1]:
        assert table.lookup(address.packed) == scan(address)


# The mesh of docs/config.md, plus a gateway whose default routes cover everyone's addresses.
MESH = [
    Peer("peer1", (ipaddress.ip_interface("10.77.0.1/24"), ipaddress.ip_interface("fd77::1/64"))),
    Peer("peer2", (ipaddress.ip_interface("10.77.0.2/24"), ipaddress.ip_interface("fd77::2/64")),
         (ipaddress.ip_network("192.168.20.0/24"),)),
    Peer("gateway", (ipaddress.ip_interface("10.77.0.9/24"),),
         (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))),
]
SOURCES = SourceFilter((str(net), p.name) for p in MESH for net in p.prefixes())


def udp(src: str, dst: str) -> bytes:
    payload = ports(1234, 5678)
    return ipv6(src, dst, 17, payload) if ":" in src else ipv4(src, dst, 17, payload)


@pytest.mark.parametrize(("sender", "source", "reason"), [
    ("peer1", "10.77.0.1", None),
    ("peer1", "fd77::1", None),
    ("peer2", "192.168.20.7", None),  # a routed prefix, not only the tunnel address
    ("peer1", "10.77.0.2", "bad_source"),  # another peer's address
    ("peer1", "fd77::2", "bad_source"),
    ("peer1", "192.168.20.7", "bad_source"),  # another peer's routed prefix
    ("peer1", "192.0.2.1", "bad_source"),  # inside no prefix of the sender
    ("peer1", "2001:db8::1", "bad_source"),
    ("peer1", "fd77::1:1", "bad_source"),  # the sender's /64 is on the TUN, its address a /128
    ("gateway", "192.0.2.1", None),  # the default route: the internet behind the gateway
    ("gateway", "2001:db8::1", None),
    ("gateway", "10.77.0.9", None),
    ("gateway", "10.77.0.1", "bad_source"),  # a more specific prefix of another peer wins
    ("gateway", "fd77::2", "bad_source"),
    ("gateway", "192.168.20.7", "bad_source"),
    ("stranger", "10.77.0.1", "bad_source"),  # a sender no peer entry names owns nothing
])
def test_source_must_be_the_senders(sender: str, source: str, reason: str | None) -> None:
    assert SOURCES.check(sender, udp(source, "10.77.0.2" if "." in source else "fd77::2")) \
        == reason


@pytest.mark.parametrize("packet", [
    b"",
    b"\x45" + b"\0" * 14,  # IPv4 cut before the end of its source address
    b"\x60" + b"\0" * 22,  # IPv6 likewise
    udp("10.77.0.1", "10.77.0.2")[:15],
    udp("fd77::1", "fd77::2")[:23],
    b"\x00" + udp("10.77.0.1", "10.77.0.2")[1:],  # version 0
    b"\x55" + udp("10.77.0.1", "10.77.0.2")[1:],  # version 5
    b"\xf0" * 40,
])
def test_malformed_packets_hold_no_source(packet: bytes) -> None:
    assert SOURCES.check("peer1", packet) == "malformed"


def test_shortest_packets_that_hold_a_source_are_checked() -> None:
    v4 = udp("10.77.0.1", "10.77.0.2")[:16]
    v6 = udp("fd77::1", "fd77::2")[:24]
    assert SOURCES.check("peer1", v4) is None
    assert SOURCES.check("peer2", v4) == "bad_source"
    assert SOURCES.check("peer1", v6) is None
    assert SOURCES.check("peer2", v6) == "bad_source"


def test_the_config_builds_the_filter_over_every_peer_this_one_included(tmp_path: Path) -> None:
    path = tmp_path / "peer2.toml"
    path.write_text('''peer = "peer2"
[database]
dsn = "host=/run/postgresql dbname=pgvpn"
[[peers]]
name = "peer1"
addresses = ["10.77.0.1/24"]
routes = ["0.0.0.0/0"]
[[peers]]
name = "peer2"
addresses = ["10.77.0.2/24"]
routes = ["192.168.20.0/24"]
''')
    sources = load(path).source_filter()
    assert sources.check("peer1", udp("192.0.2.1", "10.77.0.2")) is None
    # this agent's own address and prefix are not peer1's to send from, despite its default route
    assert sources.check("peer1", udp("10.77.0.2", "10.77.0.2")) == "bad_source"
    assert sources.check("peer1", udp("192.168.20.1", "10.77.0.2")) == "bad_source"
