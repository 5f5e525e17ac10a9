"""Fuzzing the two places where outside input enters the agent: config files and packets.

Bounded so it fits CI (hypothesis max_examples); anything other than the documented error type
escaping is a bug.
"""

from __future__ import annotations

import contextlib
import tomllib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgvpn_agent import config
from pgvpn_agent.packet import MalformedPacket, parse

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40),
                    st.floats(allow_nan=True), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)
KEYS = ["peer", "mode", "database", "tun", "transport", "metrics", "peers", "dsn", "mtu",
        "name", "addresses", "routes", "batch_max", "port", "address", "enabled"]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=8))
def test_config_parse_only_raises_config_error(raw: dict[str, Any]) -> None:
    with contextlib.suppress(config.ConfigError):
        config.parse(raw)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_config_text_only_raises_config_error(text: str) -> None:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    with contextlib.suppress(config.ConfigError):
        config.parse(raw)


def _valid() -> dict[str, Any]:
    return {"peer": "a", "database": {"dsn": "host=x"},
            "peers": [{"name": "a", "addresses": ["10.0.0.1/24"]},
                      {"name": "b", "addresses": ["10.0.0.2/24"]}]}


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(["tun", "transport", "metrics", "database"]),
       st.sampled_from(["mtu", "name", "batch_max", "queue_max", "max_age", "poll_interval",
                        "port", "address", "enabled", "connect_timeout", "password_env"]),
       values)
def test_mutated_valid_config_only_raises_config_error(table: str, key: str, value: Any) -> None:
    raw = _valid()
    raw.setdefault(table, {})[key] = value
    with contextlib.suppress(config.ConfigError):
        config.parse(raw)


@settings(max_examples=1500, deadline=None)
@given(st.binary(min_size=0, max_size=70_000))
def test_oversized_and_random_packets_only_raise_malformed(data: bytes) -> None:
    try:
        parse(data)
    except MalformedPacket as exc:
        assert exc.reason
