"""What an operator does to the set of peers: register them, cut one off at once, remove one.

Agents cannot do any of it (a peer's login reaches no operator function): `pgvpn db register`
runs as pgvpn_operator or a superuser, `pgvpn db revoke` and `pgvpn db remove` as a superuser,
since only a superuser may take a login away from a role, end its sessions whoever it is and
drop it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgvpn_agent import db

log = logging.getLogger(__name__)


def register(conn: db.Conn, names: list[str]) -> dict[str, int]:
    """Peers by name, with a link (and cursor) to every other registered peer; name -> id."""
    rows = conn.execute("SELECT name, id FROM pgvpn.register_peers(%s::text[])", (names,))
    return {str(name): int(pid) for name, pid in rows}


@dataclass(frozen=True)
class Revoked:
    role: str
    sessions: int


def revoke(conn: db.Conn, name: str) -> Revoked:
    """Cut a peer off: no new login, no rights in a session it still has, sessions ended.

    In one transaction the role loses LOGIN and the peer is marked revoked (its login then maps
    to no peer: every agent function refuses it at its next statement); then its sessions are
    terminated. Its rows stay in the log. Idempotent.
    """
    with conn.transaction():
        row = conn.execute("UPDATE pgvpn.peer SET revoked_at = coalesce(revoked_at, now()) "
                           "WHERE name = %s RETURNING db_role", (name,)).fetchone()
        if row is None:
            raise RuntimeError(f"no peer named {name!r} in pgvpn.peer")
        role = str(row[0])
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
    ended = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                         "FROM pg_stat_activity WHERE usename = %s", (role,)).fetchone()
    sessions = int(ended[0]) if ended else 0
    log.warning("revoked peer %s: role %s may not log in, %d sessions ended", name, role,
                sessions)
    return Revoked(role, sessions)


@dataclass(frozen=True)
class Removed:
    role: str
    sessions: int
    dropped: bool  # False: the role was gone already


def remove(conn: db.Conn, name: str) -> Removed:
    """Remove a peer for good: its links, cursors and login role; its rows stay in the log.

    pgvpn.remove_peer() deletes the links and cursors both ways and marks the peer removed (and
    revoked: its login maps to no peer at once); in the same transaction the role loses LOGIN.
    Its sessions are then terminated, waited for, and the role is dropped, with whatever it owns
    or was granted in this database (a peer's login owns nothing that pgvpn made). Registering
    the name again brings the peer back under its id, its links continuing their sequences.
    Idempotent: a removed peer whose role is gone is left as it is.
    """
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not row or not row[0]:
        raise RuntimeError("pgvpn db remove must run as a superuser (e.g. `sudo -u postgres "
                           "pgvpn db remove --dsn dbname=pgvpn NAME`): it drops the peer's role")
    with conn.transaction():
        try:
            row = conn.execute("SELECT pgvpn.remove_peer(%s)", (name,)).fetchone()
        except psycopg.Error as exc:
            if exc.sqlstate == "PV003":
                raise RuntimeError(str(exc.diag.message_primary or exc)) from None
            raise
        role = str(row[0]) if row else ""
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists:
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
    sessions = 0
    # Each session is waited for (up to 5 s), and one still there tried again: DROP ROLE does
    # not wait for sessions, and one left behind would outlive its role.
    for _ in range(6):
        ended = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)), "
                             "count(*) FROM pg_stat_activity WHERE usename = %s",
                             (role,)).fetchone()
        sessions += int(ended[0]) if ended else 0
        if not ended or ended[0] == ended[1]:
            break
    else:
        raise RuntimeError(f"peer {name} is removed (links, cursors, login), but a session of "
                           f"its role {role} did not end within 30 s; run `pgvpn db remove "
                           f"{name}` again to drop the role")
    if exists:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        except psycopg.errors.DependentObjectsStillExist as exc:
            raise RuntimeError(
                f"peer {name} is removed (links, cursors, login), but its role {role} still "
                f"owns objects or holds privileges in other databases: "
                f"{exc.diag.message_detail or exc}. Run DROP OWNED BY {role} in each of them "
                f"as a superuser, then `pgvpn db remove {name}` again") from None
    log.warning("removed peer %s: links and cursors deleted, role %s %s, %d sessions ended; "
                "its rows stay in the log", name, role, "dropped" if exists else "gone already",
                sessions)
    return Removed(role, sessions, bool(exists))
