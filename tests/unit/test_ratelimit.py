"""The sender's token buckets: a burst passes, a flood is cut to the rate, off costs nothing."""

from __future__ import annotations

import copy

from pgvpn_agent import config
from pgvpn_agent.ratelimit import RateLimit
from tests.unit.test_config import BASE


def test_off_by_default() -> None:
    assert RateLimit.from_config(config.parse(copy.deepcopy(BASE))) is None


def test_packets_per_second() -> None:
    limit = RateLimit(packets=100, nbytes=0, burst=0.5, min_bytes=1500)
    limit.at = 0.0
    limit.refill(0.0)
    assert sum(limit.take(1500) for _ in range(1000)) == 50  # the burst: 0.5 s of the rate
    limit.refill(1.0)
    assert sum(limit.take(1500) for _ in range(1000)) == 50  # refilled up to the bucket only
    limit.refill(1.1)
    assert sum(limit.take(60) for _ in range(1000)) == 10


def test_bytes_per_second_and_a_full_packet_always_fits() -> None:
    limit = RateLimit(packets=0, nbytes=1000, burst=0.1, min_bytes=1500)
    limit.at = 0.0
    limit.refill(0.0)
    assert limit.take(1500) and not limit.take(1)
    limit.refill(1.0)
    assert [limit.take(400) for _ in range(3)] == [True, True, False]


def test_from_config() -> None:
    raw = copy.deepcopy(BASE)
    raw["transport"] = {"rate_limit_packets": 10, "rate_limit_burst": 2.0}
    limit = RateLimit.from_config(config.parse(raw))
    assert limit is not None and limit.packet_cap == 20 and limit.byte_cap == float("inf")


def test_the_byte_bucket_holds_the_largest_read() -> None:
    """An offloaded TSO burst (up to 64 KB) must be able to pass a small byte rate, in time."""
    raw = copy.deepcopy(BASE)
    raw["transport"] = {"rate_limit_bytes": 10_000, "rate_limit_burst": 1.0}
    limit = RateLimit.from_config(config.parse(raw))
    assert limit is not None and limit.byte_cap == 65535
    raw["tun"] = {**raw.get("tun", {}), "offload": False}
    limit = RateLimit.from_config(config.parse(raw))
    assert limit is not None and limit.byte_cap == 10_000
