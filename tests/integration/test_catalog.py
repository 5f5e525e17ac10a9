"""The database's security-relevant catalog, compared with an explicit allowlist.

Every function, table, view and sequence of schema pgvpn with its owner, SECURITY DEFINER,
settings, grants and row-level security; the policies and triggers; the planner statistics the
log may keep; the pg_catalog functions a peer must not run (and pg_notify, which it may, on
purpose); the statistics views and functions, which only operators and monitoring read; what the
owner was granted outside its schema; pgcrypto's schema and who may run what in it; the
database's own privileges; the pgvpn roles, their attributes and memberships. A fresh database
and one upgraded from v10 must both match it exactly: an object added later, or a grant
widened, fails here until this list (and docs/security.md) say so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgvpn_agent import schema
from tests.integration.hostile import OPERATOR, READER, Cluster, cluster_fixture

pytestmark = pytest.mark.integration

OWNER = "pgvpn_owner"
AGENT, READERS, OPERATORS = "pgvpn_agent", "pgvpn_reader", "pgvpn_operator"
DEFINER_PATH = "search_path=pg_catalog, pgvpn, pg_temp"
SEND_BATCH = ("pgvpn.send_batch(smallint,boolean,smallint[],bigint[],bigint[],smallint[],"
              "bigint[],timestamp with time zone[],smallint[],inet[],inet[],smallint[],integer[],"
              "integer[],integer[],boolean[],bytea[],bytea[],smallint[],bigint[])")

SEND_AND_WAKE = ("pgvpn.send_and_wake(smallint,smallint[],bigint[],bigint[],smallint[],bigint[],"
                 "timestamp with time zone[],smallint[],inet[],inet[],smallint[],integer[],"
                 "integer[],integer[],boolean[],bytea[],bytea[],smallint[],bigint[])")


def definer(*execute: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"owner": OWNER, "definer": True, "config": [DEFINER_PATH, *extra],
            "execute": sorted(execute)}


def invoker(*execute: str, config: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"owner": OWNER, "definer": False, "config": list(config), "execute": sorted(execute)}


FUNCTIONS = {
    # agents: who am I, where am I woken, my lock, my batches
    "pgvpn.my_peer()": definer(AGENT, READERS),
    "pgvpn.my_channel()": definer(AGENT),
    "pgvpn.lock_peer(smallint,text)": definer(AGENT),
    SEND_BATCH: definer(AGENT),
    # the receivers of the caller's own links, up to what it committed, after the batch
    "pgvpn.wake(smallint[],bigint[])": definer(AGENT),
    # the two above in one call, two transactions (migration 0016): a procedure that commits
    # may be neither SECURITY DEFINER nor carry a SET clause; it runs as its caller
    SEND_AND_WAKE: invoker(AGENT),
    # after a database lost commits: the caller's own links, forward only (highwater.py)
    "pgvpn.advance_link(smallint,bigint)": definer(AGENT),
    # the server's timeline (a failover changes it), not the WAL position behind it (sender.py)
    "pgvpn.timeline()": definer(AGENT, READERS),
    # operators (pgvpn_reader: partitions() only)
    "pgvpn.register_peers(text[])": definer(OPERATORS),
    "pgvpn.remove_peer(text)": definer(OPERATORS, extra=("lock_timeout=2s",)),
    "pgvpn.ensure_partitions(integer)": definer(OPERATORS, extra=("lock_timeout=200ms",)),
    "pgvpn.apply_retention(integer,bigint)": definer(OPERATORS, extra=("lock_timeout=200ms",)),
    "pgvpn.index_closed_days()": definer(OPERATORS, extra=("lock_timeout=200ms",)),
    # marks closed days for autovacuum to freeze (storage parameters), lifts the mark after
    "pgvpn.freeze_closed_days()": definer(OPERATORS, extra=("lock_timeout=200ms",)),
    "pgvpn.partitions()": definer(READERS),
    # no SET: inlined into the views; names only built-ins, runs as its caller
    "pgvpn.segments(bytea,integer)": invoker(AGENT, READERS),
    # a trigger function needs no EXECUTE right to fire
    "pgvpn.notify_row()": invoker(config=(DEFINER_PATH,)),
    # a new link's carry key (migration 0015)
    "pgvpn.make_carry_key()": invoker(config=(DEFINER_PATH,)),
    # called by the owner only (migration 0011, ensure_partitions), as the owner
    "pgvpn.hide_statistics(regclass)": invoker(config=(DEFINER_PATH,)),
}

# kind, RLS enabled, forced, table grants, column grants
RELATIONS: dict[str, dict[str, Any]] = {
    "pgvpn.schema_version": {"kind": "r", "rls": [False, False],
                             "grants": {AGENT: ["SELECT"], READERS: ["SELECT"]}, "columns": {}},
    "pgvpn.peer": {"kind": "r", "rls": [False, False], "grants": {},
                   "columns": {col: {AGENT: ["SELECT"], READERS: ["SELECT"]}
                               for col in ("id", "name", "db_role", "created_at", "revoked_at")}
                   | {"bytes_per_day": {AGENT: ["SELECT"], OPERATORS: ["UPDATE"],
                                        READERS: ["SELECT"]},
                      "removed_at": {READERS: ["SELECT"]}}},
    "pgvpn.peer_id_seq": {"kind": "S", "rls": [False, False], "grants": {}, "columns": {}},
    "pgvpn.link": {"kind": "r", "rls": [True, True],
                   "grants": {AGENT: ["SELECT"], READERS: ["SELECT"]}, "columns": {}},
    "pgvpn.cursor": {"kind": "r", "rls": [True, True],
                     "grants": {AGENT: ["SELECT"], READERS: ["SELECT"]},
                     "columns": {"rx_seq": {AGENT: ["UPDATE"]}, "rx_at": {AGENT: ["UPDATE"]}}},
    # the key a link's small unsealed batches ride in the notification with: its receiver's
    "pgvpn.carry_key": {"kind": "r", "rls": [True, True], "grants": {AGENT: ["SELECT"]},
                        "columns": {}},
    "pgvpn.packet": {"kind": "p", "rls": [True, True],
                     "grants": {AGENT: ["SELECT"], READERS: ["SELECT"]}, "columns": {}},
    "pgvpn.limits": {"kind": "r", "rls": [False, False],
                     "grants": {OPERATORS: ["SELECT", "UPDATE"], READERS: ["SELECT"]},
                     "columns": {}},
    "pgvpn.usage": {"kind": "r", "rls": [False, False], "grants": {READERS: ["SELECT"]},
                    "columns": {}},
    # which backend and agent process (token) holds each peer's lock: written by lock_peer()
    "pgvpn.agent_session": {"kind": "r", "rls": [False, False],
                            "grants": {READERS: ["SELECT"]}, "columns": {}},
    "pgvpn.link_advance": {"kind": "r", "rls": [False, False],
                           "grants": {READERS: ["SELECT"]}, "columns": {}},
    # where each link of a removed peer stopped: register_peers() continues it from there
    "pgvpn.link_retired": {"kind": "r", "rls": [False, False],
                           "grants": {READERS: ["SELECT"]}, "columns": {}},
    "pgvpn.flow": {"kind": "v", "rls": [False, False], "grants": {READERS: ["SELECT"]},
                   "columns": {}},
    "pgvpn.traffic_per_minute": {"kind": "v", "rls": [False, False],
                                 "grants": {READERS: ["SELECT"]}, "columns": {}},
    # the log's partitions: day partitions carry no grant; packet_default kept the reader's
    # grant of schema v2 (readers see every row anyway)
    "pgvpn.packet_default": {"kind": "r", "rls": [False, False],
                             "grants": {READERS: ["SELECT"]}, "columns": {}},
    "pgvpn.packet_YYYYMMDD": {"kind": "r", "rls": [False, False], "grants": {}, "columns": {}},
}
for _rel in RELATIONS.values():
    _rel["owner"] = OWNER

MY_PEER = "( SELECT pgvpn.my_peer() AS my_peer)"
# the owner's policies spell my_peer() out: the caller's login, unless revoked
SESSION_PEER = ("( SELECT p.id\n   FROM pgvpn.peer p\n"
                "  WHERE ((p.db_role = SESSION_USER) AND (p.revoked_at IS NULL)))")
EITHER_END = f"(({MY_PEER} = src) OR ({MY_PEER} = dst))"


def removed_end(table: str) -> str:
    """The owner deletes only links of a removed peer (remove_peer()); cursors follow."""
    return ("(EXISTS ( SELECT\n   FROM pgvpn.peer p\n"
            f"  WHERE ((p.id = ANY (ARRAY[{table}.src, {table}.dst])) "
            "AND (p.removed_at IS NOT NULL))))")


POLICIES = {
    # agents: rows addressed to them, their links, their cursors
    "packet.peer_reads_own": ["r", [AGENT], f"(dst_peer = {MY_PEER})", None],
    "link.peer_sees_own": ["r", [AGENT], EITHER_END, None],
    "cursor.peer_sees_own": ["r", [AGENT], EITHER_END, None],
    "cursor.receiver_moves_own": ["w", [AGENT], f"(dst = {MY_PEER})", f"(dst = {MY_PEER})"],
    # a carry key: its receiver's alone (not even the sender's: it could forge a box)
    "carry_key.receiver_reads_own": ["r", [AGENT], f"(dst = {MY_PEER})", None],
    # readers: everything
    "packet.reader_reads_all": ["r", [READERS], "true", None],
    "link.reader_reads_all": ["r", [READERS], "true", None],
    "cursor.reader_reads_all": ["r", [READERS], "true", None],
    # the owner inside its definer functions: reads all; sends, advances and saves only as
    # the calling peer; adds links and cursors (register_peers, the operators')
    "packet.owner_reads": ["r", [OWNER], "true", None],
    "packet.sender_inserts": ["a", [OWNER], None, f"(src_peer = {SESSION_PEER})"],
    "link.owner_reads": ["r", [OWNER], "true", None],
    "link.owner_registers": ["a", [OWNER], None, "true"],
    "link.sender_advances": ["w", [OWNER], f"(src = {SESSION_PEER})", f"(src = {SESSION_PEER})"],
    "cursor.owner_reads": ["r", [OWNER], "true", None],
    "cursor.owner_registers": ["a", [OWNER], None, "true"],
    "cursor.receiver_saves": ["w", [OWNER], f"(dst = {SESSION_PEER})", f"(dst = {SESSION_PEER})"],
    "link.owner_removes": ["d", [OWNER], removed_end("link"), None],
    # send_batch() reads them; a new link's trigger adds one (removal: the link's cascade)
    "carry_key.owner_reads": ["r", [OWNER], "true", None],
    "carry_key.owner_registers": ["a", [OWNER], None, "true"],
}
TRIGGERS = {"packet.packet_notify": "pgvpn.notify_row()",
            "link.link_carry_key": "pgvpn.make_carry_key()"}
# Planner statistics on the log (the table and every partition): none but on logged_at, or
# EXPLAIN would show any peer who sends whom how much (pgvpn.hide_statistics)
PACKET_COLUMNS = ("src_peer", "dst_peer", "seq", "sent_at", "ip_version", "src_addr",
                  "dst_addr", "protocol", "src_port", "dst_port", "length", "fragment",
                  "payload", "offload")
LOG_STATISTICS = {**{col: [0] for col in PACKET_COLUMNS}, "logged_at": [-1]}

# pg_catalog functions a peer must not run: advisory locks (squatting another agent's key or
# housekeeping's) and large objects (storage outside every quota); pg_notify, on the same list,
# stays PUBLIC on purpose: the NOTIFY command needs no privilege at all (a DO block or a
# multi-statement query sends as many), so revoking the function would only break payload mode;
# what protects a receiver is its secret channel (test_hostile_peer: spoofed_wake_up)
CATALOG_PATTERN = r"^(pg_.*advisory.*|lo_.*|loread|lowrite|pg_notify)$"
# ... with every grant on them but the bootstrap superuser's own: what the owner's functions
# take their locks with (schema.OWNER_LOCKS), and pg_notify
OWNER_LOCKS = ["pg_advisory_unlock(integer,integer)", "pg_advisory_xact_lock(bigint)",
               "pg_try_advisory_lock(integer,integer)", "pg_try_advisory_xact_lock(bigint)"]
CATALOG_GRANTS = {
    **{sig: {OWNER: ["EXECUTE"]} for sig in OWNER_LOCKS},
    "pg_notify(text,text)": {"PUBLIC": ["EXECUTE"]},
}
# pgcrypto's functions the owner's send_batch() boxes carried rows with (schema.OWNER_CRYPTO)
OWNER_CRYPTO = ["pgvpn_crypto.encrypt_iv(bytea,bytea,bytea,text)",
                "pgvpn_crypto.gen_random_bytes(integer)", "pgvpn_crypto.hmac(bytea,bytea,text)"]
# Everything outside schema pgvpn the owner was granted: those locks, what lock_peer()
# reads to tell a live holder of a peer's lock (schema.OWNER_STATISTICS), those functions
OWNER_ELSEWHERE = sorted([*(f"FUNCTION {sig}" for sig in OWNER_LOCKS + OWNER_CRYPTO),
                          "FUNCTION pg_lock_status()", "TABLE pg_locks"])

# Statistics: who else is connected and when busy, what it locks, how each table grows. Every
# pg_catalog view and function these match is for operators and monitoring only (schema
# _STATISTICS), checked by pattern: a release that adds one is covered without a new entry.
STATISTICS_VIEWS = r"^(pg_stat_.*|pg_statio_.*|pg_locks)$"
STATISTICS_FUNCTIONS = (r"^(pg_stat_get_.*|pg_lock_status|pg_blocking_pids"
                        r"|pg_safe_snapshot_blocking_pids)$")
# ... each with exactly this ACL (the bootstrap superuser's own entry aside), but for:
STATISTICS_ACL = {"TABLE": {"pg_monitor": ["SELECT"], READERS: ["SELECT"]},
                  "FUNCTION": {"pg_monitor": ["EXECUTE"], READERS: ["EXECUTE"]}}
STATISTICS_OTHER = {
    "TABLE pg_locks": {"pg_monitor": ["SELECT"], OWNER: ["SELECT"],
                                  READERS: ["SELECT"]},
    "FUNCTION pg_lock_status()": {"pg_monitor": ["EXECUTE"], OWNER: ["EXECUTE"],
                                  READERS: ["EXECUTE"]},
}

ROLE_FLAGS = {"super": False, "createrole": False, "createdb": False, "bypassrls": False,
              "replication": False}
ROLES = {
    OWNER: {**ROLE_FLAGS, "login": False},
    AGENT: {**ROLE_FLAGS, "login": False},
    READERS: {**ROLE_FLAGS, "login": False},
    OPERATORS: {**ROLE_FLAGS, "login": False},
    # made by the lab (and the Ansible role), not by migrate
    "pgvpn_housekeeping": {**ROLE_FLAGS, "login": True},
    **{f"pgvpn_peer{i}": {**ROLE_FLAGS, "login": True} for i in (1, 2, 3)},
}
MEMBERSHIPS = sorted([
    (AGENT, "pgvpn_peer1"), (AGENT, "pgvpn_peer2"), (AGENT, "pgvpn_peer3"),
    (READERS, OPERATORS),
    (OPERATORS, "pgvpn_housekeeping"), ("pg_monitor", "pgvpn_housekeeping"),
    ("pg_signal_backend", "pgvpn_housekeeping"),
    # this test's own operator logins
    (READERS, READER), (OPERATORS, OPERATOR),
])


def _acl(acl_sql: str) -> str:
    """grantee -> sorted privileges of an ACL expression, the owner's own entry left out."""
    return f"""(SELECT coalesce(jsonb_object_agg(g, p), '{{}}'::jsonb) FROM (
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS g,
               jsonb_agg(a.privilege_type ORDER BY a.privilege_type) AS p
        FROM aclexplode({acl_sql}) a WHERE a.grantee <> a.grantor OR a.grantee = 0
        GROUP BY 1) x)"""


REL_ACL = ("coalesce(c.relacl, acldefault((CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END)"
           "::\"char\", c.relowner))")


def catalog(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The security-relevant catalog of the database `conn` is connected to, as plain data."""
    q = conn.execute
    functions = {
        sig: {"owner": owner, "definer": secdef, "config": config or [],
              "execute": sorted(k for k in grants if "EXECUTE" in grants[k])}
        for sig, owner, secdef, config, grants in q(f"""
            SELECT p.oid::regprocedure::text, p.proowner::regrole::text, p.prosecdef,
                   p.proconfig, {_acl("coalesce(p.proacl, acldefault('f', p.proowner))")}
            FROM pg_proc p WHERE p.pronamespace = 'pgvpn'::regnamespace""")}
    relations: dict[str, Any] = {}
    for name, kind, owner, rls, force, grants, columns in q(f"""
            SELECT regexp_replace(c.oid::regclass::text, '_[0-9]{{8}}$', '_YYYYMMDD'),
                   c.relkind::text, c.relowner::regrole::text, c.relrowsecurity,
                   c.relforcerowsecurity,
                   {_acl(REL_ACL)},
                   (SELECT coalesce(jsonb_object_agg(a.attname, {_acl("a.attacl")}), '{{}}')
                    FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attacl IS NOT NULL)
            FROM pg_class c
            WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relkind NOT IN ('i', 'I', 't')
            ORDER BY 1"""):
        entry = {"kind": kind, "owner": owner, "rls": [rls, force], "grants": grants,
                 "columns": columns}
        assert relations.setdefault(name, entry) == entry, f"partitions differ: {name}"
    policies = {
        f"{table}.{name}": [cmd, sorted(roles), using, check]
        for table, name, cmd, roles, using, check in q("""
            SELECT c.relname::text, p.polname::text, p.polcmd::text,
                   ARRAY(SELECT CASE r WHEN 0 THEN 'PUBLIC' ELSE r::regrole::text END
                         FROM unnest(p.polroles) r),
                   pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
            FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
            WHERE c.relnamespace = 'pgvpn'::regnamespace AND p.polpermissive""")}
    restrictive = q("SELECT count(*) FROM pg_policy WHERE NOT polpermissive").fetchone()
    log_statistics = dict(q("""
        SELECT a.attname::text, array_agg(DISTINCT a.attstattarget::int)
        FROM pg_attribute a
        WHERE a.attnum > 0 AND NOT a.attisdropped
          AND (a.attrelid = 'pgvpn.packet'::regclass OR a.attrelid IN (
               SELECT inhrelid FROM pg_inherits WHERE inhparent = 'pgvpn.packet'::regclass))
        GROUP BY 1""").fetchall())
    triggers = dict(q("""
        SELECT c.relname || '.' || t.tgname, t.tgfoid::regprocedure::text
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = 'pgvpn'::regnamespace AND NOT t.tgisinternal
          AND t.tgparentid = 0""").fetchall())
    proc_acl = _acl("coalesce(p.proacl, acldefault('f', p.proowner))")
    catalog_grants = {sig: grants for sig, grants in q(f"""
        SELECT p.oid::regprocedure::text, {proc_acl} FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname ~ %s
        ORDER BY 1""", (CATALOG_PATTERN,)) if grants}
    owner_elsewhere = [r[0] for r in q(f"""
        SELECT 'FUNCTION ' || p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace <> 'pgvpn'::regnamespace AND {_acl("p.proacl")} ? %(owner)s
        UNION ALL
        SELECT 'TABLE ' || c.oid::regclass::text FROM pg_class c
        WHERE c.relnamespace <> 'pgvpn'::regnamespace AND {_acl("c.relacl")} ? %(owner)s
        ORDER BY 1""", {"owner": OWNER})]
    statistics = {}
    for kind, name, grants in q(f"""
            SELECT 'FUNCTION', p.oid::regprocedure::text, {proc_acl} FROM pg_proc p
            WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname ~ %s
            UNION ALL
            SELECT 'TABLE', c.oid::regclass::text, {_acl(REL_ACL)} FROM pg_class c
            WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'v'
              AND c.relname ~ %s""", (STATISTICS_FUNCTIONS, STATISTICS_VIEWS)):
        if grants != STATISTICS_ACL[kind]:
            statistics[f"{kind} {name}"] = grants
    patterns = {"catalog": CATALOG_PATTERN, "functions": STATISTICS_FUNCTIONS,
                "views": STATISTICS_VIEWS}
    matched = dict(q("""
        SELECT 'catalog', count(*) FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname ~ %(catalog)s
        UNION ALL
        SELECT 'statistics functions', count(*) FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname ~ %(functions)s
        UNION ALL
        SELECT 'statistics views', count(*) FROM pg_class c
        WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'v'
          AND c.relname ~ %(views)s""", patterns).fetchall())
    # what a peer's login may use of all that, through any membership
    peer_reach = [r[0] for r in q("""
        SELECT 'FUNCTION ' || p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace
          AND (p.proname ~ %(catalog)s OR p.proname ~ %(functions)s)
          AND has_function_privilege('pgvpn_peer1', p.oid, 'EXECUTE')
        UNION ALL
        SELECT 'TABLE ' || c.oid::regclass::text FROM pg_class c
        WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'v'
          AND c.relname ~ %(views)s AND has_table_privilege('pgvpn_peer1', c.oid, 'SELECT')
        ORDER BY 1""", patterns)]
    database = q(f"""SELECT {_acl("coalesce(d.datacl, acldefault('d', d.datdba))")}
                     FROM pg_database d WHERE d.datname = current_database()""").fetchone()
    schema = q(f"""SELECT n.nspowner::regrole::text, {_acl("n.nspacl")}
                   FROM pg_namespace n WHERE n.nspname = 'pgvpn'""").fetchone()
    crypto = q(f"""SELECT n.nspowner::regrole::text,
                          (SELECT e.extowner::regrole::text FROM pg_extension e
                           WHERE e.extname = 'pgcrypto' AND e.extnamespace = n.oid),
                          {_acl("n.nspacl")}, (
                       SELECT coalesce(jsonb_object_agg(x.g, x.f), '{{}}'::jsonb) FROM (
                           SELECT a.key AS g, jsonb_agg(p.oid::regprocedure::text
                                                        ORDER BY p.oid::regprocedure::text) AS f
                           FROM pg_proc p,
                                jsonb_each({proc_acl}) a
                           WHERE p.pronamespace = n.oid AND a.value ? 'EXECUTE'
                           GROUP BY a.key) x)
                   FROM pg_namespace n WHERE n.nspname = 'pgvpn_crypto'""").fetchone()
    creatable = [r[0] for r in q("""
        SELECT n.nspname::text FROM pg_namespace n
        WHERE has_schema_privilege('pgvpn_peer1', n.oid, 'CREATE')""")]
    default_acl = [list(r) for r in q(f"""
        SELECT d.defaclrole::regrole::text, d.defaclnamespace::regnamespace::text,
               d.defaclobjtype::text, {_acl("d.defaclacl")}
        FROM pg_default_acl d ORDER BY 1, 2, 3""")]
    definers_elsewhere = [r[0] for r in q("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.prosecdef AND p.pronamespace NOT IN ('pgvpn'::regnamespace,
              'pg_catalog'::regnamespace, 'information_schema'::regnamespace)""")]
    roles = {
        name: {"super": s, "createrole": cr, "createdb": cd, "bypassrls": b,
               "replication": rep, "login": login}
        for name, s, cr, cd, b, rep, login in q("""
            SELECT rolname::text, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls,
                   rolreplication, rolcanlogin
            FROM pg_roles WHERE rolname LIKE 'pgvpn\\_%'""")}
    memberships = sorted(tuple(r) for r in q("""
        SELECT m.roleid::regrole::text, m.member::regrole::text FROM pg_auth_members m
        WHERE m.roleid::regrole::text LIKE 'pgvpn\\_%'
           OR m.member::regrole::text LIKE 'pgvpn\\_%'"""))
    return {
        "functions": functions, "relations": relations, "policies": policies,
        "restrictive_policies": restrictive[0] if restrictive else None,
        "triggers": triggers, "log_statistics": log_statistics,
        "catalog_grants": catalog_grants,
        "owner_elsewhere": owner_elsewhere, "statistics": statistics, "matched": matched,
        "peer_reach": peer_reach,
        "database": database[0] if database else None,
        "schema": list(schema) if schema else None, "creatable": creatable,
        "crypto": list(crypto) if crypto else None,
        "default_acl": default_acl, "definers_elsewhere": definers_elsewhere,
        "extensions": [r[0] for r in q("SELECT extname::text FROM pg_extension ORDER BY 1")],
        "event_triggers": [r[0] for r in q("SELECT evtname::text FROM pg_event_trigger")],
        "roles": roles, "memberships": memberships,
    }


EXPECTED: dict[str, Any] = {
    "functions": FUNCTIONS,
    "relations": RELATIONS,
    "policies": POLICIES,
    "restrictive_policies": 0,
    "triggers": TRIGGERS,
    "log_statistics": LOG_STATISTICS,
    "catalog_grants": CATALOG_GRANTS,
    "owner_elsewhere": OWNER_ELSEWHERE,
    "statistics": STATISTICS_OTHER,
    "peer_reach": ["FUNCTION pg_notify(text,text)"],
    # CONNECT and nothing else for PUBLIC: no TEMPORARY, no CREATE
    "database": {"PUBLIC": ["CONNECT"]},
    "schema": [OWNER, {AGENT: ["USAGE"], READERS: ["USAGE"]}],
    # pgcrypto's schema and the extension: a superuser's (whoever owned them could put
    # functions of their own under these names); the owner alone may use it, and of its
    # functions only three
    "crypto": ["postgres", "postgres", {OWNER: ["USAGE"]}, {OWNER: OWNER_CRYPTO}],
    "creatable": [],
    # functions the owner makes later are not executable by PUBLIC (global form, trap 13)
    "default_acl": [[OWNER, "-", "f", {}]],
    "definers_elsewhere": [],
    "extensions": ["pgcrypto", "plpgsql"],
    "event_triggers": [],
    "roles": ROLES,
    "memberships": MEMBERSHIPS,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from cluster_fixture()


@pytest.fixture(scope="module")
def catalogs(cluster: Cluster) -> Iterator[dict[str, dict[str, Any]]]:
    """The lab's database (made at the current schema) and the v10 template upgraded."""
    cluster.copy("upgraded")
    try:
        cluster.migrate("upgraded")
        found = {}
        for name, database in (("fresh", "pgvpn"), ("upgraded", "upgraded")):
            with cluster.connect(database) as conn:
                found[name] = catalog(conn)
        yield found
    finally:
        cluster.drop("upgraded")


@pytest.mark.parametrize("database", ["fresh", "upgraded"])
@pytest.mark.parametrize("section", sorted(EXPECTED))
def test_catalog_matches_the_allowlist(catalogs: dict[str, dict[str, Any]], database: str,
                                       section: str) -> None:
    assert catalogs[database][section] == EXPECTED[section]


@pytest.mark.parametrize("database", ["fresh", "upgraded"])
def test_every_definer_function_ends_its_search_path_with_pg_temp(
        catalogs: dict[str, dict[str, Any]], database: str) -> None:
    """Checked apart from the allowlist, so that a new entry cannot copy a wrong setting."""
    for sig, f in catalogs[database]["functions"].items():
        path = [c for c in f["config"] if c.startswith("search_path=")]
        if f["definer"]:
            assert path and re.search(r"\bpg_temp$", path[0]), sig
            assert f["owner"] == OWNER and "PUBLIC" not in f["execute"], sig
        assert not catalogs[database]["roles"].get(f["owner"], {}).get("super"), sig


@pytest.mark.parametrize("database", ["fresh", "upgraded"])
def test_the_catalog_patterns_match_what_they_mean(catalogs: dict[str, dict[str, Any]],
                                                   database: str) -> None:
    """The pattern-based sections prove nothing if a pattern matches nothing (PostgreSQL 15:
    21 advisory-lock and 20 large-object functions and pg_notify; 42 statistics views (pg_locks
    among them); over a hundred pg_stat_get_* functions)."""
    matched = catalogs[database]["matched"]
    assert matched["catalog"] >= 40, matched
    assert matched["statistics views"] >= 40, matched
    assert matched["statistics functions"] >= 100, matched


def test_migrate_refuses_a_pgcrypto_installed_elsewhere(cluster: Cluster) -> None:
    """An operator's pgcrypto in another schema (which peers may use): refused with the commands
    that move it, nothing migrated; moved as told, the migration runs."""
    cluster.copy("crypto_elsewhere")
    try:
        cluster.admin("CREATE EXTENSION pgcrypto", database="crypto_elsewhere")
        with pytest.raises(RuntimeError, match=r"pgcrypto is installed in schema 'public'.*"
                                               r"ALTER EXTENSION pgcrypto SET SCHEMA pgvpn_crypto"):
            cluster.migrate("crypto_elsewhere")
        assert cluster.admin("SELECT max(version) FROM pgvpn.schema_version",
                             database="crypto_elsewhere") == [(10,)]
        cluster.admin("CREATE SCHEMA pgvpn_crypto; ALTER EXTENSION pgcrypto SET SCHEMA "
                      "pgvpn_crypto", database="crypto_elsewhere")
        assert cluster.migrate("crypto_elsewhere")[-1] == schema.LATEST
        with cluster.connect("crypto_elsewhere") as conn:
            assert catalog(conn)["crypto"] == EXPECTED["crypto"]
    finally:
        cluster.drop("crypto_elsewhere")


def test_migrate_refuses_a_pgcrypto_another_role_owns(cluster: Cluster) -> None:
    """pgcrypto is a trusted extension: a role with CREATE on the database may install it and
    own it, and could then put functions of its own under its names for send_batch() to run
    as the owner. Refused, nothing migrated."""
    cluster.copy("crypto_owned")
    try:
        cluster.admin("DROP ROLE IF EXISTS crypto_squatter; CREATE ROLE crypto_squatter LOGIN")
        cluster.admin("GRANT CREATE ON DATABASE crypto_owned TO crypto_squatter; "
                      "CREATE SCHEMA pgvpn_crypto AUTHORIZATION crypto_squatter",
                      database="crypto_owned")
        with cluster.connect("crypto_owned", "crypto_squatter") as conn:
            conn.execute("CREATE EXTENSION pgcrypto WITH SCHEMA pgvpn_crypto")
        with pytest.raises(RuntimeError, match=r"pgcrypto in this database belongs to "
                                               r"'crypto_squatter', not a superuser"):
            cluster.migrate("crypto_owned")
        assert cluster.admin("SELECT max(version) FROM pgvpn.schema_version",
                             database="crypto_owned") == [(10,)]
    finally:
        cluster.drop("crypto_owned")
        cluster.admin("DROP ROLE IF EXISTS crypto_squatter")
