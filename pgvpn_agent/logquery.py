"""Reading the packet log: one filter, shared by `pgvpn log` (table/JSON) and `pgvpn pcap`."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from pgvpn_agent import db

PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class FilterError(ValueError):
    """A filter the operator has to correct; the message names the option."""


@dataclass(frozen=True)
class Filter:
    peer: str | None = None
    src_peer: str | None = None
    dst_peer: str | None = None
    addr: str | None = None
    port: int | None = None
    protocol: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = 100


def parse_time(text: str, option: str, now: datetime | None = None) -> datetime:
    """`10m`, `2h`, `1d` before now, or an ISO 8601 timestamp (UTC when no offset is given)."""
    match = _RELATIVE.match(text.strip())
    if match:
        delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{option}: {text!r} is neither like 10m/2h/1d nor an ISO "
                          "timestamp") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_protocol(text: str) -> int:
    if text.isdigit() and 0 <= int(text) <= 255:
        return int(text)
    try:
        return PROTOCOLS[text.lower()]
    except KeyError:
        raise FilterError(f"--proto: {text!r} is not a number 0-255 or one of "
                          f"{', '.join(PROTOCOLS)}") from None


def check_addr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise FilterError(f"--addr: {text!r} is not an address or prefix") from None


# One condition per filter field, with named placeholders: a value compared with either end of
# a packet is sent once. Addresses and ports match the closed days' indexes (the OR of two
# columns becomes a BitmapOr of two index scans), times the partition bounds and BRIN index.
_CONDITIONS = {
    "peer": "(s.name = %(peer)s OR d.name = %(peer)s)",
    "src_peer": "s.name = %(src_peer)s",
    "dst_peer": "d.name = %(dst_peer)s",
    "addr": "(p.src_addr <<= %(addr)s::inet OR p.dst_addr <<= %(addr)s::inet)",
    "port": "(p.src_port = %(port)s OR p.dst_port = %(port)s)",
    "protocol": "p.protocol = %(protocol)s",
    "since": "p.logged_at >= %(since)s",
    "until": "p.logged_at < %(until)s",
}


def query(f: Filter, payload: bool = False) -> tuple[sql.Composed, dict[str, Any]]:
    """The SELECT for a filter and its parameters (only the fields that are set)."""
    params = {k: getattr(f, k) for k in _CONDITIONS if getattr(f, k) is not None}
    where = [sql.SQL(_CONDITIONS[k]) for k in params]
    columns: sql.Composable = sql.SQL(
        "p.logged_at, p.sent_at, s.name, d.name, p.seq, p.ip_version, host(p.src_addr), "
        "p.src_port, host(p.dst_addr), p.dst_port, p.protocol, p.length, "
        "pgvpn.segments(p.offload, p.length)")
    if payload:
        columns = columns + sql.SQL(", p.payload")
    q = sql.SQL("SELECT {} FROM pgvpn.packet p JOIN pgvpn.peer s ON s.id = p.src_peer "
                "JOIN pgvpn.peer d ON d.id = p.dst_peer").format(columns)
    if f.addr is not None or f.port is not None:
        # closed days' address and port indexes lead with the receiving peer (schema v11):
        # naming every peer lets a filter over all of them use them
        where.append(sql.SQL("p.dst_peer = ANY (ARRAY(SELECT id FROM pgvpn.peer))"))
    if where:
        q = q + sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
    q = q + sql.SQL(" ORDER BY p.logged_at, p.src_peer, p.seq")
    if f.limit is not None:
        q = q + sql.SQL(" LIMIT %(limit)s")
        params["limit"] = f.limit
    return q, params


# segments: the wire packets a row stands for (a TSO burst logged with TUN offload is several)
FIELDS = ("logged_at", "sent_at", "src_peer", "dst_peer", "seq", "ip_version", "src_addr",
          "src_port", "dst_addr", "dst_port", "protocol", "length", "segments")


def rows(conn: db.Conn, f: Filter, payload: bool = False) -> Iterator[tuple[Any, ...]]:
    """Stream the matching rows with a server-side cursor: a pcap of millions of rows must not
    be held in memory."""
    q, params = query(f, payload)
    with conn.transaction(), conn.cursor(name="pgvpn_log", binary=True) as cur:
        cur.itersize = 2000
        cur.execute(q, params)
        yield from cur


def as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(FIELDS, row, strict=False))
    out["logged_at"] = row[0].isoformat()
    out["sent_at"] = row[1].isoformat()
    return out


def table(records: list[tuple[Any, ...]]) -> str:
    head = ("logged at (UTC)", "from", "to", "seq", "proto", "source", "destination", "bytes",
            "segs")
    lines = [head]
    for r in records:
        proto = PROTOCOL_NAMES.get(r[10], str(r[10]))
        src = _endpoint(r[6], r[7], r[5])
        dst = _endpoint(r[8], r[9], r[5])
        stamp = r[0].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        lines.append((stamp, r[2], r[3], str(r[4]), proto, src, dst, str(r[11]), str(r[12])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _endpoint(addr: str, port: int | None, version: int) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if version == 6 else f"{addr}:{port}"
