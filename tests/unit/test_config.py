"""Config validation: every error names the key and says what would be accepted."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from pgvpn_agent import config

BASE: dict[str, Any] = {
    "peer": "a",
    "database": {"dsn": "host=db dbname=pgvpn user=pgvpn_a"},
    "peers": [
        {"name": "a", "addresses": ["10.1.0.1/24", "fd01::1/64"]},
        {"name": "b", "addresses": ["10.1.0.2/24"], "routes": ["192.168.2.0/24"]},
    ],
}


def with_(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        target = raw
        for p in path:
            target = target.setdefault(p, {}) if not p.isdigit() else target[int(p)]
        target[key] = value
    return raw


def error(raw: dict[str, Any]) -> str:
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw)
    return str(info.value)


def test_defaults_and_routes() -> None:
    cfg = config.parse(copy.deepcopy(BASE))
    assert cfg.mode == "logged" and cfg.transport.batch_max == 256 and cfg.tun.mtu == 1500
    table = cfg.route_table()
    assert table.lookup(bytes([10, 1, 0, 2])) == "b"
    assert table.lookup(bytes([192, 168, 2, 9])) == "b"
    assert table.lookup(bytes([10, 1, 0, 1])) is None, "our own address is not routed out"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (with_(mode="fast"), "mode: 'fast' is not one of logged, trigger, payload"),
        (with_(peer="zz"), "peer: 'zz' is not among [[peers]] (a, b)"),
        (with_(tun__mtu=100), "tun.mtu: 100 is out of range 1280..65535"),
        (with_(tun__mtu="big"), "tun.mtu: must be an integer"),
        (with_(tun__name="a-very-long-interface"), "tun.name:"),
        (with_(transport__batch_max=0), "transport.batch_max: 0 is out of range"),
        (with_(transport__max_age=True), "transport.max_age: must be a number"),
        (with_(database__dsn="host=db password=x"), "database.dsn: contains a password"),
        (with_(database__password_file="/a", database__password_env="B"),
         "database: set only one of password_file and password_env"),
        (with_(database__colour="red"), "database.colour: unknown key"),
        (with_(metrics__address="localhost"), "metrics.address: 'localhost' is not an IP"),
        (with_(metrics__enabled="yes"), "metrics.enabled: must be true or false"),
        (with_(mode="payload", tun__mtu=9000), "tun.mtu: 9000 cannot travel in payload mode"),
        (with_(peers__1__name="a"), "peers[1].name: peer 'a' is listed twice"),
        (with_(peers__1__addresses=[]), "peers[1].addresses: peer 'b' needs at least one"),
        (with_(peers__1__addresses=["10.1.0.300/24"]), "peers[1].addresses: '10.1.0.300/24'"),
        (with_(peers__1__routes=["192.168.2.1/24"]), "has host bits set"),
        (with_(peers__0__routes=["192.168.2.0/24"]), "192.168.2.0/24 is claimed by both"),
        (with_(peers__1__name="b c"), "peers[1].name: 'b c' must be"),
        ({"peer": "a", "database": {"dsn": "x"}, "peers": []}, "peers: at least two"),
        ({"peer": "a", "peers": BASE["peers"]}, "database: missing table [database]"),
    ],
)
def test_errors_name_the_key(raw: dict[str, Any], expected: str) -> None:
    assert expected in error(raw)


def test_overlapping_prefixes_of_other_peers(tmp_path: Path) -> None:
    raw = copy.deepcopy(BASE)
    raw["peers"].append({"name": "c", "addresses": ["10.1.0.3/24"], "routes": ["192.168.2.0/24"]})
    assert "claimed by both 'b' and 'c'" in error(raw)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("peer = \n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(bad)


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = config.parse(with_(database__password_file=str(secret)))
    assert cfg.database.password() == "s3cret"
    cfg = config.parse(with_(database__password_env="PGVPN_TEST_PW"))
    monkeypatch.delenv("PGVPN_TEST_PW", raising=False)
    with pytest.raises(config.ConfigError, match="PGVPN_TEST_PW is not set"):
        cfg.database.password()
    monkeypatch.setenv("PGVPN_TEST_PW", "x")
    assert cfg.database.password() == "x"
