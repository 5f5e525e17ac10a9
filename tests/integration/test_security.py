"""Peer isolation in the database: a peer reads only its own traffic and writes only as itself."""

from __future__ import annotations

import time

import psycopg
import pytest

from pgvpn_agent import db, wire
from pgvpn_agent.config import Database
from pgvpn_agent.lab import Lab
from pgvpn_agent.sender import SEND_BATCH
from tests.packets import ipv4, ports

pytestmark = pytest.mark.integration


@pytest.fixture
def lab(make_lab) -> Lab:
    """Three peers with traffic between all of them, logged."""
    lab = make_lab(peers=3)
    for a in lab.peers:
        for b in lab.peers:
            if a is not b:
                assert lab.ping(a, b)
    return lab


def as_peer(lab: Lab, name: str) -> db.Conn:
    return db.connect(Database(dsn=lab.dsn(f"pgvpn_{name}")), "attacker")


def refused(conn: db.Conn, query: str, params: tuple[object, ...] = ()) -> str:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params)
    return info.value.sqlstate or ""


def ids(lab: Lab) -> dict[str, int]:
    rows = lab.psql("SELECT name || '=' || id FROM pgvpn.peer").split()
    return {k: int(v) for k, v in (r.split("=") for r in rows)}


def test_peer_reads_only_rows_addressed_to_it(lab):
    peer = ids(lab)
    with as_peer(lab, "peer1") as conn:
        rows = conn.execute("SELECT DISTINCT dst_peer FROM pgvpn.packet").fetchall()
        assert rows == [(peer["peer1"],)]
        assert conn.execute("SELECT count(*) FROM pgvpn.packet WHERE dst_peer = %s",
                            (peer["peer2"],)).fetchone() == (0,)
        # the partitions themselves are not readable either
        part = lab.psql("SELECT inhrelid::regclass FROM pg_inherits "
                        "WHERE inhparent = 'pgvpn.packet'::regclass LIMIT 1")
        assert refused(conn, f"SELECT * FROM {part}") == "42501"
        assert all(peer["peer1"] in r for r in conn.execute("SELECT src, dst FROM pgvpn.link"))


def test_peer_cannot_forge_update_or_delete_log_rows(lab):
    peer = ids(lab)
    with as_peer(lab, "peer1") as conn:
        assert refused(conn, "INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, "
                       "ip_version, src_addr, dst_addr, protocol, length, payload) VALUES "
                       "(%s, %s, 999999, now(), 4, '10.77.0.2', '10.77.0.3', 1, 1, '\\x00')",
                       (peer["peer2"], peer["peer3"])) == "42501"
        assert refused(conn, "UPDATE pgvpn.packet SET payload = '\\x00'") == "42501"
        assert refused(conn, "DELETE FROM pgvpn.packet") == "42501"
        assert refused(conn, "TRUNCATE pgvpn.packet") == "42501"
        assert refused(conn, "UPDATE pgvpn.link SET tx_seq = 0") == "42501"
        # send_batch() claiming to be peer2
        packet = ipv4("10.77.0.2", "10.77.0.3", 17, ports(1, 2))
        n = 1
        sqlstate = refused(conn, SEND_BATCH, (
            peer["peer2"], True, wire.fixed("int2", [peer["peer3"]]),
            wire.fixed("int8", [10**9]), wire.fixed("int8", [10**9]),
            wire.fixed("int2", [peer["peer3"]]), wire.fixed("int8", [10**9]),
            wire.timestamps([time.time()]), wire.fixed("int2", [4]),
            wire.blobs("inet", [wire.INET4 + packet[12:16]]),
            wire.blobs("inet", [wire.INET4 + packet[16:20]]), wire.fixed("int2", [17]),
            wire.nullable_int4([1]), wire.nullable_int4([2]), wire.fixed("int4", [len(packet)]),
            wire.booleans([False]), wire.blobs("bytea", [packet] * n),
            wire.blobs("bytea", [None] * n), wire.fixed("int2", []), wire.fixed("int8", [])))
        assert sqlstate == "42501"
    assert lab.psql("SELECT count(*) FROM pgvpn.packet WHERE seq = 1000000000") == "0"


def test_peer_cannot_move_another_peers_cursor(lab):
    peer = ids(lab)
    before = lab.psql("SELECT rx_seq FROM pgvpn.cursor "
                      f"WHERE src = {peer['peer1']} AND dst = {peer['peer2']}")
    with as_peer(lab, "peer1") as conn:
        cur = conn.execute("UPDATE pgvpn.cursor SET rx_seq = 0 WHERE dst = %s",
                           (peer["peer2"],))
        assert cur.rowcount == 0
        with pytest.raises(psycopg.Error):
            conn.execute("UPDATE pgvpn.cursor SET dst = %s WHERE dst = %s",
                         (peer["peer2"], peer["peer1"]))
    after = lab.psql("SELECT rx_seq FROM pgvpn.cursor "
                     f"WHERE src = {peer['peer1']} AND dst = {peer['peer2']}")
    assert before == after


def test_cursors_carried_by_a_batch_are_only_the_senders_own(lab):
    """send_batch() saves the caller's receiver cursors: only rows whose receiver is the caller,
    and never past what was sent on that link (a cursor ahead would skip future packets)."""
    peer = ids(lab)
    cursors = "SELECT src || '>' || dst || '=' || rx_seq FROM pgvpn.cursor ORDER BY 1"
    sent = dict(r.split("=") for r in lab.psql(
        "SELECT src || '>' || dst || '=' || tx_seq FROM pgvpn.link ORDER BY 1").split())
    before = dict(r.split("=") for r in lab.psql(cursors).split())
    sources = sorted(peer.values())

    def carry(conn: db.Conn, last: list[int]) -> None:
        # a batch without packets that only carries cursors, naming every source peer
        empty_int2, empty_int8 = wire.fixed("int2", []), wire.fixed("int8", [])
        conn.execute(SEND_BATCH, (
            peer["peer1"], False, empty_int2, empty_int8, empty_int8, empty_int2, empty_int8,
            wire.timestamps([]), empty_int2, wire.blobs("inet", []), wire.blobs("inet", []),
            empty_int2, wire.nullable_int4([]), wire.nullable_int4([]), wire.fixed("int4", []),
            wire.booleans([]), wire.blobs("bytea", []), wire.blobs("bytea", []),
            wire.fixed("int2", sources), wire.fixed("int8", last)))

    lab.stop_agent(lab.peers[0])  # its receiver would move peer1's cursors too
    with as_peer(lab, "peer1") as conn:
        carry(conn, [10**9] * len(sources))
        assert dict(r.split("=") for r in lab.psql(cursors).split()) == before, \
            "a cursor moved past the last packet sent on its link"
        carry(conn, [int(sent.get(f"{s}>{peer['peer1']}", 0)) for s in sources])
    after = dict(r.split("=") for r in lab.psql(cursors).split())
    assert before.keys() == after.keys() and len(after) == 6
    for link, seq in after.items():
        if link.endswith(f">{peer['peer1']}"):
            assert seq == sent[link], link
        else:
            assert seq == before[link], f"peer1 moved the cursor of link {link}"


def test_a_carry_key_is_its_receivers_alone(lab):
    """A link's carry key (schema v15) opens the boxes its small batches ride in: its receiver
    reads it, nobody else (not the sender either: it could box packets the log never saw, did
    it learn the channel too), and no peer can change one or run pgcrypto itself."""
    peer = ids(lab)
    keys = {tuple(map(int, r.split(">"))) for r in lab.psql(
        "SELECT src || '>' || dst FROM pgvpn.carry_key").split()}
    assert keys == {(s, d) for s in peer.values() for d in peer.values() if s != d}
    for name, me in peer.items():
        with as_peer(lab, name) as conn:
            seen = conn.execute("SELECT src, dst, octet_length(key) FROM pgvpn.carry_key "
                                "ORDER BY src").fetchall()
            assert seen == [(s, me, 64) for s in sorted(peer.values()) if s != me], name
            assert conn.execute("SELECT count(*) FROM pgvpn.carry_key WHERE src = %s",
                                (me,)).fetchone() == (0,), f"{name} reads its outgoing keys"
            for statement in ("UPDATE pgvpn.carry_key SET key = key",
                              "DELETE FROM pgvpn.carry_key",
                              f"INSERT INTO pgvpn.carry_key (src, dst) VALUES ({me}, {me})",
                              "SELECT pgvpn_crypto.gen_random_bytes(1)",
                              "SELECT pgvpn.make_carry_key()"):
                assert refused(conn, statement) in ("42501", "0A000"), (name, statement)
    lab.psql("CREATE ROLE auditor LOGIN IN ROLE pgvpn_reader")
    with psycopg.connect(lab.dsn("auditor")) as conn:
        assert refused(conn, "SELECT key FROM pgvpn.carry_key") == "42501"


def test_peer_cannot_change_the_schema(lab):
    with as_peer(lab, "peer1") as conn:
        assert refused(conn, "DROP TABLE pgvpn.packet") == "42501"
        assert refused(conn, "ALTER TABLE pgvpn.packet DISABLE ROW LEVEL SECURITY") == "42501"
        assert refused(conn, "CREATE TABLE pgvpn.x (a int)") == "42501"
        assert refused(conn, "DROP POLICY peer_reads_own ON pgvpn.packet") == "42501"


def test_reader_role_sees_everything_and_changes_nothing(lab):
    lab.psql("CREATE ROLE operator LOGIN IN ROLE pgvpn_reader")
    with psycopg.connect(lab.dsn("operator")) as conn:
        distinct = conn.execute("SELECT count(DISTINCT dst_peer) FROM pgvpn.packet").fetchone()
        assert distinct == (3,)
        with pytest.raises(psycopg.Error):
            conn.execute("DELETE FROM pgvpn.packet")
