"""Config validation: every error names the key and says what would be accepted."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from pgvpn_agent import config

BASE: dict[str, Any] = {
    "peer": "a",
    "database": {"dsn": "host=db dbname=pgvpn user=pgvpn_a", "sslrootcert": "/etc/pgvpn/ca.crt"},
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
    assert cfg.tun.offload
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
        (with_(mode="payload", tun__mtu=9000, transport__allow_payload_mode=True),
         "tun.mtu: 9000 cannot travel in payload mode"),
        (with_(mode="payload", tun__offload=True, transport__allow_payload_mode=True),
         "tun.offload: payload mode cannot carry offloaded bursts"),
        (with_(tun__offload=1), "tun.offload: must be true or false"),
        (with_(transport__coalesce=0.5), "transport.coalesce: 0.5 is out of range 0..0.1"),
        (with_(peers__1__name="a"), "peers[1].name: peer 'a' is listed twice"),
        (with_(peers__1__addresses=[]), "peers[1].addresses: peer 'b' needs at least one"),
        (with_(peers__1__addresses=["10.1.0.300/24"]), "peers[1].addresses: '10.1.0.300/24'"),
        (with_(peers__1__routes=["192.168.2.1/24"]), "has host bits set"),
        (with_(peers__0__routes=["192.168.2.0/24"]), "192.168.2.0/24 is claimed by both"),
        (with_(peers__1__name="b c"), "peers[1].name: 'b c' must be"),
        ({"peer": "a", "database": {"dsn": "host=/run/pg"}, "peers": []}, "peers: at least two"),
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


@pytest.mark.parametrize(
    ("database", "expected"),
    [
        ({"sslmode": "require"}, "database.sslmode: 'require' does not authenticate"),
        ({"sslmode": "disable"}, "set database.allow_plaintext = true"),
        ({"sslmode": "tls"}, "database.sslmode: 'tls' is not one of disable"),
        ({"sslrootcert": None}, "database.sslrootcert: required with sslmode verify-full"),
        ({"sslmode": "verify-ca", "sslrootcert": None, "allow_plaintext": True},
         "database.sslrootcert: required with sslmode verify-ca"),
        ({"sslcert": "/etc/pgvpn/client.crt"}, "database: set both sslcert and sslkey"),
        ({"allow_plaintext": "yes"}, "database.allow_plaintext: must be true or false"),
        ({"dsn": "host=db user=pgvpn_a sslmode=disable"},
         "database.dsn: sets sslmode; use database.sslmode instead"),
        ({"dsn": "postgresql://db/pgvpn?sslrootcert=/x"}, "database.dsn: sets sslrootcert"),
        ({"dsn": "host=db dbname"}, "database.dsn: not a libpq connection string"),
        ({"dsn": "host=/run/pg hostaddr=192.0.2.1", "sslrootcert": None},
         "database.sslrootcert: required"),
    ],
)
def test_tls_errors_name_the_key(database: dict[str, Any], expected: str) -> None:
    raw = copy.deepcopy(BASE)
    raw["database"].update(database)
    raw["database"] = {k: v for k, v in raw["database"].items() if v is not None}
    assert expected in error(raw)


def test_tls_defaults_to_verify_full() -> None:
    cfg = config.parse(copy.deepcopy(BASE))
    assert cfg.database.tls() == {"sslmode": "verify-full", "sslrootcert": "/etc/pgvpn/ca.crt"}
    assert not cfg.database.insecure
    cfg = config.parse(with_(database__sslcert="/c.crt", database__sslkey="/c.key"))
    assert cfg.database.tls()["sslcert"] == "/c.crt" and cfg.database.tls()["sslkey"] == "/c.key"


def test_plaintext_only_by_the_explicit_switch() -> None:
    cfg = config.parse(with_(database__sslmode="disable", database__allow_plaintext=True))
    assert cfg.database.insecure and cfg.database.tls() == {
        "sslmode": "disable", "sslrootcert": "/etc/pgvpn/ca.crt"}
    assert not config.parse(with_(database__allow_plaintext=True)).database.insecure


@pytest.mark.parametrize("dsn", ["host=/run/postgresql dbname=pgvpn",
                                 "postgresql://pgvpn_a@%2Frun%2Fpg/pgvpn",
                                 "host=/run/a,/run/b dbname=pgvpn", "dbname=pgvpn"])
def test_unix_sockets_need_no_tls(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGHOSTADDR", raising=False)
    cfg = config.parse({**BASE, "database": {"dsn": dsn}})
    assert cfg.database.tls() == {} and not cfg.database.insecure


def test_a_dsn_without_host_follows_pghost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "db.example")
    assert "database.sslrootcert: required" in error({**BASE, "database": {"dsn": "dbname=x"}})


@pytest.mark.parametrize("dsn", ["service=pgvpn", "service=pgvpn dbname=pgvpn"])
def test_a_service_without_host_needs_tls(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service file may name a network host the agent cannot see: TLS as for any."""
    for name in ("PGHOST", "PGHOSTADDR", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    assert "database.sslrootcert: required" in error({**BASE, "database": {"dsn": dsn}})
    ok = config.parse({**BASE, "database": {"dsn": "service=pgvpn host=/run/postgresql"}})
    assert ok.database.tls() == {}
    monkeypatch.setenv("PGSERVICE", "pgvpn")
    assert "database.sslrootcert: required" in error({**BASE, "database": {"dsn": "dbname=x"}})


@pytest.mark.parametrize("name", ["agent", "Reader", "operator", "owner", "house-keeping",
                                  "housekeeping", "metrics"])
def test_reserved_peer_names(name: str) -> None:
    raw = copy.deepcopy(BASE)
    raw["peers"][1]["name"] = name
    if name == "house-keeping":  # its role, pgvpn_house_keeping, is nobody's: allowed
        config.parse(raw)
        return
    assert "is reserved" in error(raw) and "choose another name" in error(raw)


def test_payload_mode_is_opt_in() -> None:
    message = error(with_(mode="payload"))
    assert message.startswith("mode: ")
    assert "any role that can connect" in message and "LISTEN" in message
    assert "transport.allow_payload_mode = true" in message
    cfg = config.parse(with_(mode="payload", transport__allow_payload_mode=True))
    assert cfg.mode == "payload"


def test_rate_limit_keys() -> None:
    t = config.parse(copy.deepcopy(BASE)).transport
    assert (t.rate_limit_packets, t.rate_limit_bytes, t.rate_limit_burst) == (0, 0, 1.0)
    t = config.parse(with_(transport__rate_limit_packets=5000,
                           transport__rate_limit_bytes=12_500_000,
                           transport__rate_limit_burst=0.5)).transport
    assert (t.rate_limit_packets, t.rate_limit_bytes, t.rate_limit_burst) == (
        5000, 12_500_000, 0.5)
    assert "transport.rate_limit_packets: -1 is out of range" in error(
        with_(transport__rate_limit_packets=-1))
    assert "transport.rate_limit_bytes: must be an integer" in error(
        with_(transport__rate_limit_bytes="10MB"))
    assert "transport.rate_limit_burst: 0 is out of range" in error(
        with_(transport__rate_limit_burst=0))


def test_retention_keys() -> None:
    r = config.parse(copy.deepcopy(BASE)).retention
    assert (r.keep_days, r.max_bytes, r.on_disk_full) == (None, None, "drop_new")
    r = config.parse(with_(retention__keep_days=7, retention__max_size="1.5GB",
                           retention__on_disk_full="drop_oldest")).retention
    assert (r.keep_days, r.max_bytes, r.on_disk_full) == (7, int(1.5 * 1024**3), "drop_oldest")
    assert "retention.on_disk_full: 'drop' is not one of drop_new, drop_oldest" in error(
        with_(retention__on_disk_full="drop"))
    assert "retention.max_size: '50 apples'" in error(with_(retention__max_size="50 apples"))


def test_several_servers_connect_to_the_one_that_takes_writes() -> None:
    """host=db1,db2,db3: libpq keeps the primary (read-write, unless the dsn says primary)."""
    from pgvpn_agent import db

    cfg = config.parse(with_(database__dsn="host=db1,db2,db3 dbname=pgvpn user=pgvpn_a"))
    assert db.connect_kwargs(cfg.database, "t")["target_session_attrs"] == "read-write"
    cfg = config.parse(with_(database__dsn="host=db1,db2 target_session_attrs=primary"))
    assert "target_session_attrs" not in db.connect_kwargs(cfg.database, "t")
    assert "target_session_attrs must be read-write or primary" in error(
        with_(database__dsn="host=db1,db2 target_session_attrs=prefer-standby"))
