"""A hostile peer's workbench: one lab cluster, a template database at the previous schema, a copy
of it per attack, and batches built field by field so that any of them can be made wrong.

Roles are cluster-wide, databases are not: every attack gets its own database (a copy of the
template at schema v10), tries its exploit there as a real peer login, is migrated in place to the
current schema and tries again. Whatever an exploit did to the cluster (a role made superuser) is
undone before the next one starts.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgvpn_agent import schema, wire
from pgvpn_agent.lab import Lab
from pgvpn_agent.sender import SEND_BATCH
from tests.packets import ipv4, ports

PREVIOUS = 10  # the schema version attacks are shown to work against
TEMPLATE = f"pgvpn_v{PREVIOUS}"
PEERS = ("peer1", "peer2", "peer3")
READER = "hostile_reader"  # a login in pgvpn_reader: an operator reading the log
OPERATOR = "hostile_operator"  # a login in pgvpn_operator (exists from schema v11)
# Packets each peer sent to each other peer in the template: links start at tx_seq = SENT.
SENT = 3
# The expected SQLSTATEs of a refused call: not allowed, bad input, over quota.
DENIED = "42501"
BAD_INPUT = "PV003"
OVER_QUOTA = "PV002"

_counter = itertools.count(1)

# send_batch()'s parameters in order, with the types a hand-built batch is cast to. The agent
# sends binary arrays (SEND_BATCH); here every element may be NULL and every array any length.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("p_src", "int2"), ("p_notify", "bool"),
    ("l_dst", "int2[]"), ("l_first", "int8[]"), ("l_last", "int8[]"),
    ("r_dst", "int2[]"), ("r_seq", "int8[]"), ("r_sent_at", "timestamptz[]"),
    ("r_version", "int2[]"), ("r_src_addr", "inet[]"), ("r_dst_addr", "inet[]"),
    ("r_protocol", "int2[]"), ("r_src_port", "int4[]"), ("r_dst_port", "int4[]"),
    ("r_length", "int4[]"), ("r_fragment", "bool[]"), ("r_payload", "bytea[]"),
    ("r_offload", "bytea[]"), ("c_src", "int2[]"), ("c_last", "int8[]"),
)
SEND_ANY = ("SELECT pgvpn.send_batch("
            + ", ".join(f"%({name})s::{kind}" for name, kind in COLUMNS) + ")")
ROW_COLUMNS = tuple(name for name, _ in COLUMNS if name.startswith("r_"))

Batch = dict[str, Any]


def address(peer_id: int) -> str:
    return f"10.77.0.{peer_id}"


def batch(src: int, rows: list[tuple[int, int]], links: list[tuple[int, int, int]] | None = None,
          payload: bytes | None = None, notify: bool = False) -> Batch:
    """A batch from peer `src`: rows (dst, seq), links (dst, first, last) derived from the rows
    unless given. Every field is a plain list, for the caller to break."""
    if links is None:
        spans: dict[int, list[int]] = {}
        for dst, seq in rows:
            spans.setdefault(dst, []).append(seq)
        links = [(d, min(s), max(s)) for d, s in sorted(spans.items())]
    now = datetime.now(UTC)
    packets = [payload if payload is not None
               else ipv4(address(src), address(dst), 17, ports(4000, 5000) + b"x" * 8)
               for dst, _ in rows]
    return {
        "p_src": src, "p_notify": notify,
        "l_dst": [d for d, _, _ in links], "l_first": [f for _, f, _ in links],
        "l_last": [last for _, _, last in links],
        "r_dst": [d for d, _ in rows], "r_seq": [s for _, s in rows],
        "r_sent_at": [now] * len(rows), "r_version": [4] * len(rows),
        "r_src_addr": [address(src)] * len(rows), "r_dst_addr": [address(d) for d, _ in rows],
        "r_protocol": [17] * len(rows), "r_src_port": [4000] * len(rows),
        "r_dst_port": [5000] * len(rows), "r_length": [len(p) for p in packets],
        "r_fragment": [False] * len(rows), "r_payload": packets,
        "r_offload": [None] * len(rows), "c_src": [], "c_last": [],
    }


def send_any(conn: psycopg.Connection[Any], b: Batch) -> None:
    """Call send_batch() with whatever `b` holds."""
    conn.execute(SEND_ANY, b)


def send(conn: psycopg.Connection[Any], src: int, dst: int, first: int, count: int = 1,
         notify: bool = True) -> None:
    """What an honest agent sends: `count` packets to `dst` from seq `first` on, with the agent's
    own statement and binary arrays (pgvpn_agent/sender.py)."""
    seqs = list(range(first, first + count))
    packet = ipv4(address(src), address(dst), 17, ports(4000, 5000) + b"hello")
    conn.execute(SEND_BATCH, (
        src, notify, wire.fixed("int2", [dst]), wire.fixed("int8", [first]),
        wire.fixed("int8", [seqs[-1]]), wire.fixed("int2", [dst] * count),
        wire.fixed("int8", seqs), wire.timestamps([time.time()] * count),
        wire.fixed("int2", [4] * count), wire.blobs("inet", [wire.INET4 + packet[12:16]] * count),
        wire.blobs("inet", [wire.INET4 + packet[16:20]] * count), wire.fixed("int2", [17] * count),
        wire.nullable_int4([4000] * count), wire.nullable_int4([5000] * count),
        wire.fixed("int4", [len(packet)] * count), wire.booleans([False] * count),
        wire.blobs("bytea", [packet] * count), wire.blobs("bytea", [None] * count),
        wire.fixed("int2", []), wire.fixed("int8", [])))


@dataclass
class Cluster:
    """The lab's PostgreSQL and the template database at schema v10."""

    lab: Lab
    ids: dict[str, int] = field(default_factory=dict)

    def dsn(self, database: str, user: str = "postgres") -> str:
        return self.lab.dsn(user).replace("dbname=pgvpn", f"dbname={database}")

    def connect(self, database: str, user: str = "postgres") -> psycopg.Connection[Any]:
        """An autocommit session that cannot hang a test on a lock."""
        conn = psycopg.connect(self.dsn(database, user), autocommit=True,
                               options="-c lock_timeout=5s -c statement_timeout=120s")
        wire.register(conn)
        return conn

    def admin(self, query: str | sql.SQL | sql.Composed, params: Any = None,
              database: str = "postgres") -> list[Any]:
        """Run one statement as the superuser; its rows (empty when it returns none)."""
        with self.connect(database) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def migrate(self, database: str, target: int | None = None) -> list[int]:
        """`pgvpn db migrate` as the superuser, in place."""
        with self.connect(database) as conn:
            return schema.migrate(conn, target=target)

    def copy(self, database: str) -> None:
        self.admin(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(database), sql.Identifier(TEMPLATE)))

    def drop(self, database: str) -> None:
        self.admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(database)))

    def undo(self, database: str) -> None:
        """Take back what an exploit gained cluster-wide, and end its sessions."""
        self.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
        for (role,) in self.admin("SELECT rolname FROM pg_roles WHERE rolsuper "
                                  "AND rolname <> 'postgres'"):
            self.admin(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(role)))


def build_template(cluster: Cluster) -> None:
    """The database a v10 deployment has: schema v10, three peers, a little traffic logged."""
    cluster.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    assert cluster.migrate(TEMPLATE, target=PREVIOUS) == list(range(1, PREVIOUS + 1))
    with cluster.connect(TEMPLATE) as conn:
        rows = conn.execute("SELECT name, id FROM pgvpn.register_peers(%s::text[])",
                            (list(PEERS),)).fetchall()
    cluster.ids = {str(name): int(pid) for name, pid in rows}
    for src in PEERS:
        with cluster.connect(TEMPLATE, f"pgvpn_{src}") as conn:
            for dst in PEERS:
                if dst != src:
                    send(conn, cluster.ids[src], cluster.ids[dst], 1, SENT, notify=False)


def start_cluster() -> Cluster:
    """A lab with three peer logins and no agents; the template database; the reader login."""
    n = next(_counter)
    workdir = Path(tempfile.mkdtemp(prefix="pgvpn-hostile-", dir="/tmp"))
    workdir.chmod(0o755)
    lab = Lab.create(workdir, peers=len(PEERS), prefix=f"pgvh{os.getpid() % 100000}-{n}-",
                     port=57000 + n)
    lab.up(agents=False)
    cluster = Cluster(lab)
    try:
        for role, group in ((READER, "pgvpn_reader"), (OPERATOR, "pgvpn_operator")):
            cluster.admin(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(role), sql.Identifier(group)))
        build_template(cluster)
    except BaseException:
        lab.down()
        raise
    return cluster


def cluster_fixture() -> Iterator[Cluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.lab.down()
