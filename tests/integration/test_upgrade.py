"""A database made by schema v10 is migrated in place while agents of that version run.

Their open sessions keep logging and delivering, in order, through the migration (the function
signatures they call are unchanged); a v10 receiver gets no more wake-ups (its channel name is
no longer used) and finds packets by polling; at their next connect they stop with a clear
message, since the schema is newer than they know. Agents of this version then run on it.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg
import pytest

from pgvpn_agent import db, schema, wire
from pgvpn_agent.config import Database
from pgvpn_agent.lab import Lab
from pgvpn_agent.receiver import FETCH, SAVE_CURSORS
from pgvpn_agent.sender import SEND_BATCH
from tests.packets import ipv4, ports

pytestmark = pytest.mark.integration
PGVPN = [sys.executable, "-m", "pgvpn_agent"]


def batch(src: int, dst: int, first: int, count: int) -> tuple[object, ...]:
    """A v10 agent's send_batch() arguments: `count` UDP packets src -> dst from seq `first`."""
    packets = [ipv4("10.77.0.1", "10.77.0.2", 17, ports(1000 + i, 7)) for i in range(count)]
    seqs = list(range(first, first + count))
    return (src, True, wire.fixed("int2", [dst]), wire.fixed("int8", [first]),
            wire.fixed("int8", [seqs[-1]]), wire.fixed("int2", [dst] * count),
            wire.fixed("int8", seqs), wire.timestamps([time.time()] * count),
            wire.fixed("int2", [4] * count),
            wire.blobs("inet", [wire.INET4 + p[12:16] for p in packets]),
            wire.blobs("inet", [wire.INET4 + p[16:20] for p in packets]),
            wire.fixed("int2", [17] * count), wire.nullable_int4([1000 + i for i in range(count)]),
            wire.nullable_int4([7] * count), wire.fixed("int4", [len(p) for p in packets]),
            wire.booleans([False] * count), wire.blobs("bytea", packets),
            wire.blobs("bytea", [None] * count), wire.fixed("int2", []), wire.fixed("int8", []))


def fetch(conn: db.Conn, me: int, src: int, after: int) -> list[int]:
    cur = conn.cursor(binary=True)
    cur.execute(FETCH, (3600.0, [src], [after], me, 100))
    return [int(r[1]) for r in cur.fetchall()]


def test_v10_database_upgraded_under_running_v10_agents(make_lab):
    lab: Lab = make_lab(peers=2, agents=False, schema=10)
    ids = dict(r.split("=") for r in lab.psql("SELECT name || '=' || id FROM pgvpn.peer").split())
    p1, p2 = int(ids["peer1"]), int(ids["peer2"])
    sender = db.connect(Database(dsn=lab.dsn("pgvpn_peer1")), "pgvpn-peer1-tx")
    receiver = db.connect(Database(dsn=lab.dsn("pgvpn_peer2")), "pgvpn-peer2-rx")
    try:
        receiver.execute("LISTEN pgvpn_peer2")
        sender.execute(SEND_BATCH, batch(p1, p2, 1, 3), prepare=True)
        assert [n.payload for n in receiver.notifies(timeout=2, stop_after=1)] == [f"{p1}:3"]
        assert fetch(receiver, p2, p1, 0) == [1, 2, 3]

        out = subprocess.run([*PGVPN, "db", "migrate", "--dsn", lab.dsn()], check=True,
                             capture_output=True, text=True).stdout
        assert "applied migrations 11" in out, out

        # the v10 sessions, still open: logging and delivery go on, in order
        sender.execute(SEND_BATCH, batch(p1, p2, 4, 3), prepare=True)
        assert fetch(receiver, p2, p1, 3) == [4, 5, 6]
        receiver.execute(SAVE_CURSORS, ([p1], [6], p2))
        assert list(receiver.notifies(timeout=1.5)) == [], \
            "a v10 receiver's channel gets no wake-ups any more: it polls"
        # a v10 sender that skipped or repeated a sequence number is refused, not misdelivered
        with pytest.raises(psycopg.Error) as refused:
            sender.execute(SEND_BATCH, batch(p1, p2, 9, 1))
        assert refused.value.sqlstate in ("PV001", "PV003")
    finally:
        sender.close()
        receiver.close()
    assert lab.psql("SELECT string_agg(seq::text, ',' ORDER BY seq) FROM pgvpn.packet") \
        == "1,2,3,4,5,6"
    # at its next connect a v10 agent stops with its own clear message: the schema is newer
    with db.connect(Database(dsn=lab.dsn("pgvpn_peer1")), "pgvpn-peer1-tx") as conn:
        assert schema.current_version(conn) == schema.LATEST > 10
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM pgvpn.register_peers(ARRAY['peer1', 'peer2'])")
    # everything in the schema now belongs to the owner, whatever made it
    owners = lab.psql(
        "SELECT string_agg(DISTINCT pg_get_userbyid(relowner), ',') FROM pg_class "
        "WHERE relnamespace = 'pgvpn'::regnamespace")
    functions = lab.psql(
        "SELECT string_agg(DISTINCT pg_get_userbyid(proowner), ',') FROM pg_proc "
        "WHERE pronamespace = 'pgvpn'::regnamespace")
    assert owners == functions == schema.OWNER

    # this version's agents and housekeeping on the upgraded database
    with db.connect(Database(dsn=lab.dsn()), "pgvpn-lab") as conn:
        lab.add_housekeeping_role(conn)
    lab.start_housekeeping()
    for peer in lab.peers:
        lab.start_agent(peer)
    lab.wait_mesh(30)
    assert lab.psql(f"SELECT rx_seq FROM pgvpn.cursor WHERE src = {p1} AND dst = {p2}") != "0"
