"""Versioned schema migrations for the `pgvpn` schema.

Migrations are plain SQL files shipped in the package (`migrations/NNNN_name.sql`) and applied
in order, each in its own transaction, under an advisory lock so that two installers racing
(two Ansible hosts, an agent and an operator) apply each file exactly once.

From schema v11 the schema belongs to a NOLOGIN owner role that is not a superuser, and the
migrations run as that role. What only a superuser may do — the group roles, taking over objects
an earlier version let the superuser own, the database-wide privileges a peer must not have —
happens first, in `_harden`, as the superuser that runs `pgvpn db migrate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

_LOCK_KEY = 0x7067_7670  # "pgvp": the advisory lock held while migrating
OWNER = "pgvpn_owner"
# The first version whose migrations run as the owner on a hardened database.
HARDENED = 11
GROUP_ROLES = ("pgvpn_agent", "pgvpn_reader", "pgvpn_operator")
# pg_catalog functions PUBLIC may run by default that a peer must not: advisory locks (a peer
# could squat another agent's key or housekeeping's) and large objects (storage outside every
# quota). The owner's definer functions take their locks with the three granted back to it.
_REVOKED = """
SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace
  AND (p.proname LIKE 'pg%advisory%' OR p.proname LIKE 'lo\\_%'
       OR p.proname IN ('loread', 'lowrite'))
ORDER BY 1
"""
# pgcrypto, for the carry boxes of send_batch() (migration 0015): in a schema of its own that
# only the owner may use, and of its functions only these.
CRYPTO_SCHEMA = "pgvpn_crypto"
OWNER_CRYPTO = ("gen_random_bytes(integer)", "encrypt_iv(bytea,bytea,bytea,text)",
                "hmac(bytea,bytea,text)")
OWNER_LOCKS = ("pg_try_advisory_lock(integer,integer)", "pg_advisory_unlock(integer,integer)",
               "pg_advisory_xact_lock(bigint)", "pg_try_advisory_xact_lock(bigint)")
# What the owner's lock_peer() reads of _STATISTICS: who holds an agent's lock.
OWNER_STATISTICS = ("TABLE pg_catalog.pg_locks", "FUNCTION pg_catalog.pg_lock_status()")
# Who else is connected and when it is busy, what it locks, how each table grows: PUBLIC may
# read all of it by default, and a peer would learn from it who talks when. Operators
# (pgvpn_reader) and monitoring (pg_monitor) keep it.
_STATISTICS = """
SELECT 'FUNCTION', 'EXECUTE', p.oid::regprocedure::text FROM pg_catalog.pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace
  AND (p.proname LIKE 'pg\\_stat\\_get\\_%'
       OR p.proname IN ('pg_lock_status', 'pg_blocking_pids', 'pg_safe_snapshot_blocking_pids',
                        'pg_isolation_test_session_is_blocked'))
UNION ALL
SELECT 'TABLE', 'SELECT', c.oid::regclass::text FROM pg_catalog.pg_class c
WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'v'
  AND (c.relname LIKE 'pg\\_stat\\_%' OR c.relname LIKE 'pg\\_statio\\_%'
       OR c.relname = 'pg_locks')
ORDER BY 1, 3
"""
# Objects an earlier version created as the superuser; indexes, TOAST tables and identity
# sequences follow their table.
_ADOPT = """
SELECT 'TABLE', c.oid::regclass::text FROM pg_catalog.pg_class c
WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND c.relowner <> %(owner)s::regrole
UNION ALL
SELECT 'SEQUENCE', c.oid::regclass::text FROM pg_catalog.pg_class c
WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relkind = 'S'
  AND c.relowner <> %(owner)s::regrole
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
UNION ALL
SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, p.oid::regprocedure::text
FROM pg_catalog.pg_proc p
WHERE p.pronamespace = 'pgvpn'::regnamespace AND p.proowner <> %(owner)s::regrole
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations shipped with this agent, oldest first."""
    found = []
    for entry in resources.files("pgvpn_agent.migrations").iterdir():
        stem, _, ext = entry.name.partition(".")
        if ext != "sql":
            continue
        number, _, name = stem.partition("_")
        found.append(Migration(int(number), name, entry.read_text()))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("pgvpn migrations are not numbered 1..N")
    return found


LATEST = len(migrations())


def current_version(conn: psycopg.Connection[Any]) -> int:
    """0 when the schema has never been installed."""
    row = conn.execute(
        "SELECT to_regclass('pgvpn.schema_version') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM pgvpn.schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection[Any], owner: str = OWNER,
            target: int | None = None) -> list[int]:
    """Bring the schema to `target` (LATEST); returns the versions applied (empty when there).

    `target` below HARDENED builds a database as those versions did, superuser-owned: the tests
    use it to show an attack working before the upgrade and failing after.
    """
    target = LATEST if target is None else target
    if not 1 <= target <= LATEST:
        raise RuntimeError(f"no schema version {target}: this agent knows 1..{LATEST}")
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if not row or not row[0]:
            raise RuntimeError(
                "pgvpn db migrate must run as a superuser (e.g. `sudo -u postgres pgvpn db migrate "
                "--dsn dbname=pgvpn`): it creates the pgvpn group roles and takes PUBLIC's rights "
                "to temporary tables, advisory locks and large objects away in this database")
        conn.execute("CREATE SCHEMA IF NOT EXISTS pgvpn")
        hardened = target >= HARDENED
        if hardened:
            _harden(conn, owner)
        conn.execute(
            """CREATE TABLE IF NOT EXISTS pgvpn.schema_version (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        version = current_version(conn)
        if version > LATEST:
            raise RuntimeError(
                f"database schema is version {version}, newer than this agent knows ({LATEST}); "
                "upgrade the agent"
            )
        if hardened:
            conn.execute(sql.SQL("ALTER TABLE pgvpn.schema_version OWNER TO {}").format(
                sql.Identifier(owner)))
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
        for m in migrations()[version:target]:
            log.info("applying migration %04d_%s", m.version, m.name)
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute(
                    "INSERT INTO pgvpn.schema_version (version, name) VALUES (%s, %s)",
                    (m.version, m.name),
                )
            applied.append(m.version)
        conn.execute("SELECT pgvpn.ensure_partitions()")
        conn.execute("RESET ROLE")
    return applied


def _harden(conn: psycopg.Connection[Any], owner: str) -> None:
    """What only a superuser may do, idempotent: roles, ownership, database-wide privileges."""
    ident = sql.Identifier(owner)
    for role in (owner, *GROUP_ROLES):
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
    # operators read what readers read
    if not conn.execute("SELECT 1 FROM pg_auth_members WHERE roleid = 'pgvpn_reader'::regrole "
                        "AND member = 'pgvpn_operator'::regrole").fetchone():
        conn.execute("GRANT pgvpn_reader TO pgvpn_operator")
    row = conn.execute("SELECT rolsuper OR rolbypassrls OR rolcanlogin FROM pg_roles "
                       "WHERE rolname = %s", (owner,)).fetchone()
    if row and row[0]:
        raise RuntimeError(f"the schema owner {owner!r} must be a NOLOGIN role that is neither "
                           "superuser nor BYPASSRLS: choose another --owner")
    conn.execute(sql.SQL("ALTER SCHEMA pgvpn OWNER TO {}").format(ident))
    conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA pgvpn FROM PUBLIC"))
    for kind, name in conn.execute(_ADOPT, {"owner": owner}).fetchall():
        conn.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(
            sql.SQL(kind), sql.SQL(name), ident))
    database = sql.Identifier(str(conn.info.dbname))
    conn.execute(sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(database))
    # PostgreSQL 15 made new databases so; one upgraded from an older release still lets
    # anyone create objects in public
    conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    for (function,) in conn.execute(_REVOKED).fetchall():
        conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(
            sql.SQL(function)))
    for function in OWNER_LOCKS:
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
            sql.SQL(function), ident))
    for kind, privilege, name in conn.execute(_STATISTICS).fetchall():
        conn.execute(sql.SQL("REVOKE {privilege} ON {kind} {name} FROM PUBLIC; "
                             "GRANT {privilege} ON {kind} {name} TO pg_monitor, pgvpn_reader")
                     .format(privilege=sql.SQL(privilege), kind=sql.SQL(kind),
                             name=sql.SQL(name)))
    for thing in OWNER_STATISTICS:
        privilege = "SELECT" if thing.startswith("TABLE") else "EXECUTE"
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
            sql.SQL(privilege), sql.SQL(thing), ident))
    _crypto(conn, owner)
    conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} REVOKE EXECUTE ON FUNCTIONS "
                         "FROM PUBLIC").format(ident))
    # statistics an earlier version let ANALYZE gather on the log and the links (0011: none
    # but the log's time)
    conn.execute("""DELETE FROM pg_catalog.pg_statistic s USING pg_catalog.pg_attribute a
                    WHERE a.attrelid = s.starelid AND a.attnum = s.staattnum
                      AND a.attname <> 'logged_at'
                      AND (s.starelid IN (to_regclass('pgvpn.packet'),
                                          to_regclass('pgvpn.link'), to_regclass('pgvpn.cursor'))
                           OR s.starelid IN (SELECT inhrelid FROM pg_catalog.pg_inherits
                                             WHERE inhparent = to_regclass('pgvpn.packet')))""")


def _crypto(conn: psycopg.Connection[Any], role: str) -> None:
    """pgcrypto in CRYPTO_SCHEMA, a superuser's, usable by `role` (the schema owner) alone: a
    peer reaches no function of it."""
    # Whoever owns the schema or the extension could put functions of their own under these
    # names, which send_batch() would run as the owner: a superuser's, or refused.
    row = conn.execute("SELECT n.nspname, r.rolname, r.rolsuper FROM pg_catalog.pg_extension e "
                       "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
                       "JOIN pg_catalog.pg_roles r ON r.oid = e.extowner "
                       "WHERE e.extname = 'pgcrypto'").fetchone()
    schema = sql.Identifier(CRYPTO_SCHEMA)
    if row is None:
        available = conn.execute("SELECT 1 FROM pg_catalog.pg_available_extensions "
                                 "WHERE name = 'pgcrypto'").fetchone()
        if not available:
            raise RuntimeError("the PostgreSQL server has no pgcrypto extension: install its "
                               "contrib modules (Debian: part of postgresql-15)")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(sql.SQL("CREATE EXTENSION pgcrypto WITH SCHEMA {}").format(schema))
    elif row[0] != CRYPTO_SCHEMA:
        raise RuntimeError(
            f"pgcrypto is installed in schema {row[0]!r} of this database; pgvpn needs it in "
            f"{CRYPTO_SCHEMA!r}, which only its owner may use (`ALTER EXTENSION pgcrypto SET "
            f"SCHEMA {CRYPTO_SCHEMA}` after `CREATE SCHEMA {CRYPTO_SCHEMA}`, if nothing else "
            "uses it there)")
    elif not row[2]:
        raise RuntimeError(
            f"pgcrypto in this database belongs to {row[1]!r}, not a superuser: drop it "
            "(`DROP EXTENSION pgcrypto`) and run `pgvpn db migrate` again, which installs its own")
    conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO CURRENT_USER").format(schema))
    conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(schema))
    conn.execute(sql.SQL("REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {} FROM PUBLIC").format(schema))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(role)))
    for function in OWNER_CRYPTO:
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {}.{} TO {}").format(
            schema, sql.SQL(function), sql.Identifier(role)))


def check_version(conn: psycopg.Connection[Any]) -> None:
    """Refuse to run against a schema this agent was not written for."""
    version = current_version(conn)
    if version != LATEST:
        raise RuntimeError(
            f"database schema is at version {version}, this agent needs {LATEST}: "
            "run `pgvpn db migrate` on the database host"
        )
