"""The agent's TOML configuration, validated once at start.

Every error names the key at fault and says what would be accepted, because the agent usually
runs under systemd where a vague message costs an operator a debugging session.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

from pgvpn_agent.routing import RouteTable, RoutingError, SourceFilter

MODES = ("logged", "trigger", "payload")
ON_DISK_FULL = ("drop_new", "drop_oldest")
# When a batch's receivers are woken: by a second transaction after its commit that writes no
# row (no WAL flush to wait for: the notification lock held for microseconds), or by a NOTIFY
# inside it (the lock held through the WAL flush and the standby's confirmation: one notifying
# commit at a time in the whole cluster). Migration 0013. "auto": inside for a batch the sender
# waited for, after for one whose packets were already waiting (sender.wakes_in_commit).
WAKES = ("auto", "in_commit", "after_commit")
# libpq's sslmode values, weakest first; only verify-full authenticates the server by name.
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TLS_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey")
PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")
# Peer names whose login role (pgvpn_<name>) would be one of the project's own roles.
RESERVED_PEER_NAMES = ("agent", "reader", "operator", "owner", "housekeeping", "metrics")
# NOTIFY payloads are limited to 8000 bytes; a packet travels base64-encoded with a short header.
PAYLOAD_MODE_MAX_MTU = 5900
_TWO_PEERS = "peers: at least two [[peers]] tables are required (this one and another)"

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration problem, phrased for the operator who has to fix it."""


@dataclass(frozen=True)
class Peer:
    name: str
    addresses: tuple[Interface, ...]
    routes: tuple[Network, ...] = ()

    def prefixes(self) -> list[Network]:
        """Everything routed to this peer: its tunnel addresses as hosts, plus its routes."""
        hosts: list[Network] = [ipaddress.ip_network(a.ip) for a in self.addresses]
        return hosts + list(self.routes)


@dataclass(frozen=True)
class Database:
    dsn: str
    password_file: Path | None = None
    password_env: str | None = None
    connect_timeout: float = 5.0
    # Seconds after which a silent network path to the database counts as dead: TCP keepalives
    # and tcp_user_timeout end the connection, the agent reconnects (DESIGN.md trap 18).
    dead_path_timeout: float = 10.0
    # None leaves TLS to the dsn and libpq: `--dsn` on the command line, unix sockets.
    sslmode: str | None = None
    sslrootcert: Path | None = None
    sslcert: Path | None = None
    sslkey: Path | None = None
    # True when database.allow_plaintext let a network dsn through without verify-full: the
    # agent says so at every start.
    insecure: bool = False

    def tls(self) -> dict[str, str]:
        """libpq TLS parameters; they override the dsn, which may not set them (parse)."""
        values = {"sslmode": self.sslmode, "sslrootcert": self.sslrootcert,
                  "sslcert": self.sslcert, "sslkey": self.sslkey}
        return {k: str(v) for k, v in values.items() if v is not None}

    def password(self) -> str | None:
        """Read the secret at connect time so a rotated password file needs no restart."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"database.password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from exc
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"database.password_env: environment variable {self.password_env} is not set"
                )
            return value
        return None


@dataclass(frozen=True)
class Tun:
    name: str = "pgvpn0"
    mtu: int = 1500
    txqueuelen: int = 1000
    # TSO and checksum offload on the TUN: a row holds what the kernel hands over, up to a
    # 64 KB TCP burst (tun.py). Off: one row per wire-sized packet, at several times the cost.
    offload: bool = True
    # Back-to-back TCP bursts of one flow in a batch joined into one row (bursts.py).
    join_bursts: bool = True


@dataclass(frozen=True)
class Transport:
    batch_max: int = 256
    queue_max: int = 8192
    max_age: float = 30.0
    poll_interval: float = 1.0
    fetch_max: int = 512
    # Seconds a read of only a few packets waits for more before they go in one batch (0: off).
    coalesce: float = 0.0
    # Seconds a delivered page's cursor may wait for a batch of the sender to carry it before
    # the receiver commits it itself (0: after every page). See docs/config.md.
    save_delay: float = 0.01
    allow_payload_mode: bool = False
    # Send limits of this agent (0: none); the bucket holds rate_limit_burst seconds of each.
    rate_limit_packets: int = 0
    rate_limit_bytes: int = 0
    rate_limit_burst: float = 1.0
    # Where the sender keeps the last sequence number it saw committed per link (highwater.py);
    # None: in memory only.
    state_file: Path | None = None
    wake: str = "auto"


@dataclass(frozen=True)
class Metrics:
    enabled: bool = True
    address: str = "0.0.0.0"
    port: int = 9478


@dataclass(frozen=True)
class Retention:
    """What the housekeeping service (`pgvpn db housekeeping`) drops, and when.

    Off by default: deleting an audit log is the operator's decision.
    """

    keep_days: int | None = None
    max_bytes: int | None = None
    every: float = 300.0
    # What frees space before the database refuses inserts for a full disk: drop_new leaves the
    # log alone (the senders drop what cannot be logged) and waits for the operator;
    # drop_oldest drops the oldest closed day of the log, one at a time, while fewer than
    # min_free bytes are available where today's log is written.
    on_disk_full: str = "drop_new"
    min_free: int = 1 << 30


@dataclass(frozen=True)
class Config:
    peer: str
    database: Database
    peers: tuple[Peer, ...]
    mode: str = "logged"
    tun: Tun = field(default_factory=Tun)
    transport: Transport = field(default_factory=Transport)
    metrics: Metrics = field(default_factory=Metrics)
    retention: Retention = field(default_factory=Retention)
    # Payload encryption at rest (seal.py): the keys this peer shares with every other peer.
    keys_file: Path | None = None

    @property
    def me(self) -> Peer:
        return next(p for p in self.peers if p.name == self.peer)

    @property
    def others(self) -> tuple[Peer, ...]:
        return tuple(p for p in self.peers if p.name != self.peer)

    def route_table(self) -> RouteTable:
        return RouteTable((str(net), p.name) for p in self.others for net in p.prefixes())

    def source_filter(self) -> SourceFilter:
        """Incoming packets: every peer's prefixes, this one's included (a source this agent owns
        is no other peer's to send from)."""
        return SourceFilter((str(net), p.name) for p in self.peers for net in p.prefixes())


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse(raw)


def parse(raw: dict[str, Any]) -> Config:
    """Validate a decoded TOML document; unknown keys are errors so typos do not pass silently."""
    _known(raw, "", {"peer", "mode", "database", "tun", "transport", "metrics", "peers",
                     "retention", "encryption"})
    peer = _str(raw, "", "peer", required=True)
    mode = _str(raw, "", "mode", default="logged")
    if mode not in MODES:
        raise ConfigError(f"mode: {mode!r} is not one of {', '.join(MODES)}")

    database = _database(_table(raw, "database", required=True))

    tun_raw = _table(raw, "tun")
    _known(tun_raw, "tun.", {"name", "mtu", "txqueuelen", "offload", "join_bursts"})
    tun_name = _str(tun_raw, "tun.", "name", default="pgvpn0")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", tun_name):
        raise ConfigError(f"tun.name: {tun_name!r} is not a valid interface name (1-15 chars)")
    tun = Tun(
        name=tun_name,
        mtu=_int(tun_raw, "tun.", "mtu", 1500, lo=1280, hi=65535),
        txqueuelen=_int(tun_raw, "tun.", "txqueuelen", 1000, lo=10, hi=100_000),
        # Payload mode's NOTIFY carries at most 8000 bytes: no room for a 64 KB burst.
        offload=_bool(tun_raw, "tun.", "offload", mode != "payload"),
        join_bursts=_bool(tun_raw, "tun.", "join_bursts", True),
    )
    if mode == "payload" and tun.offload:
        raise ConfigError("tun.offload: payload mode cannot carry offloaded bursts (up to 64 KB) "
                          "in an 8000-byte NOTIFY payload; remove tun.offload or set it to false")
    if mode == "payload" and tun.mtu > PAYLOAD_MODE_MAX_MTU:
        raise ConfigError(
            f"tun.mtu: {tun.mtu} cannot travel in payload mode, whose NOTIFY payload is limited "
            f"to 8000 bytes; use tun.mtu <= {PAYLOAD_MODE_MAX_MTU} or mode = \"logged\""
        )

    tr_raw = _table(raw, "transport")
    _known(tr_raw, "transport.",
           {"batch_max", "queue_max", "max_age", "poll_interval", "fetch_max", "coalesce",
            "save_delay", "allow_payload_mode", "rate_limit_packets", "rate_limit_bytes",
            "rate_limit_burst", "state_file", "wake"})
    transport = Transport(
        batch_max=_int(tr_raw, "transport.", "batch_max", 256, lo=1, hi=10_000),
        queue_max=_int(tr_raw, "transport.", "queue_max", 8192, lo=1, hi=10_000_000),
        max_age=_num(tr_raw, "transport.", "max_age", 30.0, lo=0.1, hi=86_400 * 7),
        poll_interval=_num(tr_raw, "transport.", "poll_interval", 1.0, lo=0.01, hi=3600),
        fetch_max=_int(tr_raw, "transport.", "fetch_max", 512, lo=1, hi=100_000),
        coalesce=_num(tr_raw, "transport.", "coalesce", 0.0, lo=0, hi=0.1),
        save_delay=_num(tr_raw, "transport.", "save_delay", 0.01, lo=0, hi=1.0),
        allow_payload_mode=_bool(tr_raw, "transport.", "allow_payload_mode"),
        rate_limit_packets=_int(tr_raw, "transport.", "rate_limit_packets", 0, lo=0,
                                hi=10_000_000),
        rate_limit_bytes=_int(tr_raw, "transport.", "rate_limit_bytes", 0, lo=0, hi=10**12),
        rate_limit_burst=_num(tr_raw, "transport.", "rate_limit_burst", 1.0, lo=0.01, hi=60),
        state_file=(Path(tr_raw["state_file"]) if _str(tr_raw, "transport.", "state_file")
                    else None),
        wake=_str(tr_raw, "transport.", "wake") or "auto",
    )
    if transport.wake not in WAKES:
        raise ConfigError(f"transport.wake: {transport.wake!r} is not one of {', '.join(WAKES)}")
    if mode == "payload" and not transport.allow_payload_mode:
        raise ConfigError(
            "mode: \"payload\" sends every packet inside a NOTIFY payload, and PostgreSQL does "
            "not access-control NOTIFY channels: any role that can connect to the database can "
            "LISTEN on any peer's channel and read its packets, and nothing is logged. Set "
            "transport.allow_payload_mode = true to accept that (benchmarks), or use mode = "
            "\"logged\""
        )

    m_raw = _table(raw, "metrics")
    _known(m_raw, "metrics.", {"enabled", "address", "port"})
    enabled = _bool(m_raw, "metrics.", "enabled", default=True)
    address = _str(m_raw, "metrics.", "address", default="0.0.0.0")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"metrics.address: {address!r} is not an IP address") from None
    metrics = Metrics(enabled=enabled, address=address,
                      port=_int(m_raw, "metrics.", "port", 9478, lo=1, hi=65535))

    retention = parse_retention(_table(raw, "retention"))
    peers = _peers(raw)
    if peer not in {p.name for p in peers}:
        raise ConfigError(
            f"peer: {peer!r} is not among [[peers]] ({', '.join(p.name for p in peers)})"
        )
    e_raw = _table(raw, "encryption")
    _known(e_raw, "encryption.", {"keys_file"})
    keys_file = _str(e_raw, "encryption.", "keys_file", default=None)
    if keys_file and mode == "payload":
        raise ConfigError("encryption.keys_file: payload mode stores nothing to encrypt at rest; "
                          "use mode = \"logged\" or drop [encryption]")
    config = Config(peer=peer, mode=mode, database=database, tun=tun, transport=transport,
                    metrics=metrics, peers=peers, retention=retention,
                    keys_file=Path(keys_file) if keys_file else None)
    try:
        # every peer's prefixes, ours included: two peers must never claim the same prefix
        RouteTable((str(net), p.name) for p in peers for net in p.prefixes())
    except RoutingError as exc:
        raise ConfigError(f"peers: {exc}") from exc
    return config


def _database(raw: dict[str, Any]) -> Database:
    _known(raw, "database.", {"dsn", "password_file", "password_env", "connect_timeout",
                              "dead_path_timeout", "allow_plaintext", *_TLS_KEYS})
    dsn = _str(raw, "database.", "dsn", required=True)
    if re.search(r"(^|\s)password\s*=", dsn) or re.search(r"://[^/@:]*:[^/@]*@", dsn):
        raise ConfigError(
            "database.dsn: contains a password; put it in database.password_file or "
            "database.password_env instead"
        )
    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError as exc:
        raise ConfigError(f"database.dsn: not a libpq connection string: {exc}") from None
    if params.get("target_session_attrs", "read-write") not in ("read-write", "primary"):
        raise ConfigError("database.dsn: target_session_attrs must be read-write or primary "
                          "(the default): the agent writes every packet")
    for key in _TLS_KEYS:
        if key in params:
            raise ConfigError(f"database.dsn: sets {key}; use database.{key} instead, where "
                              "the agent checks it")
    pw_file = _str(raw, "database.", "password_file", default=None)
    pw_env = _str(raw, "database.", "password_env", default=None)
    if pw_file is not None and pw_env is not None:
        raise ConfigError("database: set only one of password_file and password_env")
    paths = {key: _str(raw, "database.", key, default=None) for key in _TLS_KEYS[1:]}
    if (paths["sslcert"] is None) != (paths["sslkey"] is None):
        raise ConfigError("database: set both sslcert and sslkey (a client certificate and its "
                          "key), or neither")
    allow_plaintext = _bool(raw, "database.", "allow_plaintext")
    sslmode = _str(raw, "database.", "sslmode", default=None)
    if sslmode is not None and sslmode not in SSLMODES:
        raise ConfigError(f"database.sslmode: {sslmode!r} is not one of {', '.join(SSLMODES)}")
    # libpq ignores sslmode on a unix socket, which its file permissions and pg_hba `local`
    # lines guard. Without a host libpq takes PGHOST, else its default socket directory —
    # unless a service names one in a file the agent does not read: then it may be a network
    # host, and TLS is required as for any.
    service = params.get("service") or os.environ.get("PGSERVICE")
    hosts = str(params.get("host") or os.environ.get("PGHOST")
                or ("service" if service else "/")).split(",")
    local = (not (params.get("hostaddr") or os.environ.get("PGHOSTADDR"))
             and all(h.startswith(("/", "@")) for h in hosts))
    insecure = False
    if not local:
        sslmode = sslmode or "verify-full"
        if sslmode != "verify-full":
            if not allow_plaintext:
                raise ConfigError(
                    f"database.sslmode: {sslmode!r} does not authenticate the database server "
                    "(only verify-full checks its certificate and name): passwords and packets "
                    "could be read or changed on the way. Use sslmode = \"verify-full\" with "
                    "sslrootcert, or set database.allow_plaintext = true to accept that"
                )
            insecure = True
        if sslmode in ("verify-ca", "verify-full") and paths["sslrootcert"] is None:
            raise ConfigError(
                f"database.sslrootcert: required with sslmode {sslmode}: the CA certificate "
                "that signed the database server's certificate (\"system\": the OS's CAs)"
            )
    return Database(
        dsn=dsn,
        password_file=Path(pw_file) if pw_file else None,
        password_env=pw_env,
        connect_timeout=_num(raw, "database.", "connect_timeout", 5.0, lo=0.5, hi=300),
        dead_path_timeout=_num(raw, "database.", "dead_path_timeout", 10.0, lo=3, hi=3600),
        sslmode=sslmode,
        insecure=insecure,
        **{k: Path(v) if v is not None else None for k, v in paths.items()},
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_retention(raw: dict[str, Any]) -> Retention:
    _known(raw, "retention.", {"keep_days", "max_size", "every", "on_disk_full", "min_free"})
    keep = raw.get("keep_days")
    if keep is not None:
        keep = _int(raw, "retention.", "keep_days", 0, lo=1, hi=36_500)
    max_bytes = _size(raw, "max_size")
    min_free = _size(raw, "min_free")
    every = _num(raw, "retention.", "every", 300.0, lo=10, hi=86_400)
    on_disk_full = _str(raw, "retention.", "on_disk_full", default="drop_new")
    if on_disk_full not in ON_DISK_FULL:
        raise ConfigError(f"retention.on_disk_full: {on_disk_full!r} is not one of "
                          f"{', '.join(ON_DISK_FULL)}")
    return Retention(keep_days=keep, max_bytes=max_bytes, every=every, on_disk_full=on_disk_full,
                     min_free=Retention.min_free if min_free is None else min_free)


def _size(raw: dict[str, Any], key: str) -> int | None:
    size = raw.get(key)
    if size is None:
        return None
    match = _SIZE.match(str(size)) if isinstance(size, str | int) else None
    if not match or isinstance(size, bool):
        raise ConfigError(f"retention.{key}: {size!r} is not a size like \"50GB\"")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


def _peers(raw: dict[str, Any]) -> tuple[Peer, ...]:
    items = raw.get("peers")
    if not isinstance(items, list) or not items:
        raise ConfigError(_TWO_PEERS)
    peers: list[Peer] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"peers[{i}]."
        if not isinstance(item, dict):
            raise ConfigError(f"peers[{i}]: must be a table ([[peers]])")
        _known(item, where, {"name", "addresses", "routes"})
        name = _str(item, where, "name", required=True)
        check_peer_name(name, f"{where}name")
        if name in seen:
            raise ConfigError(f"{where}name: peer {name!r} is listed twice")
        seen.add(name)
        addrs = _list(item, where, "addresses", required=True)
        if not addrs:
            raise ConfigError(f"{where}addresses: peer {name!r} needs at least one tunnel address")
        addresses: list[Interface] = []
        for a in addrs:
            try:
                addresses.append(ipaddress.ip_interface(a))
            except ValueError:
                raise ConfigError(
                    f"{where}addresses: {a!r} is not an address with prefix, e.g. 10.0.0.1/24"
                ) from None
        routes: list[Network] = []
        for r in _list(item, where, "routes"):
            try:
                routes.append(ipaddress.ip_network(r))
            except ValueError as exc:
                raise ConfigError(f"{where}routes: {r!r}: {exc}") from None
        peers.append(Peer(name=name, addresses=tuple(addresses), routes=tuple(routes)))
    if len(peers) < 2:
        raise ConfigError(_TWO_PEERS)
    return tuple(peers)


def check_peer_name(name: str, where: str) -> None:
    if not PEER_NAME.match(name):
        raise ConfigError(
            f"{where}: {name!r} must be 1-50 characters of letters, digits, '_', '.', '-'")
    role = re.sub(r"[^a-z0-9_]", "_", name.lower())
    if role in RESERVED_PEER_NAMES:
        raise ConfigError(f"{where}: {name!r} is reserved (its login role pgvpn_{role} would "
                          "be one of pgvpn's own roles); choose another name")


def _known(table: dict[str, Any], where: str, keys: set[str]) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (known here: {', '.join(sorted(keys))})"
        )


def _table(raw: dict[str, Any], key: str, required: bool = False) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key}: missing table [{key}]")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table [{key}]")
    return value


def _str(raw: dict[str, Any], where: str, key: str, *, required: bool = False,
         default: Any = None) -> Any:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where}{key}: missing (a string is required)")
        return default
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}{key}: must be a non-empty string, got {value!r}")
    return value


def _bool(raw: dict[str, Any], where: str, key: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{key}: must be true or false, got {value!r}")
    return value


def _list(raw: dict[str, Any], where: str, key: str, *, required: bool = False) -> list[str]:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where}{key}: missing (a list of strings is required)")
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}{key}: must be a list of strings, got {value!r}")
    return value


def _int(raw: dict[str, Any], where: str, key: str, default: int, *, lo: int, hi: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}{key}: must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}{key}: {value} is out of range {lo}..{hi}")
    return value


def _num(raw: dict[str, Any], where: str, key: str, default: float, *, lo: float,
         hi: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{where}{key}: must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}{key}: {value} is out of range {lo}..{hi}")
    return float(value)
