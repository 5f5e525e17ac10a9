"""What an operator does to the set of peers: register them, and cut one off at once.

Agents cannot do either (a peer's login reaches no operator function): `pgvpn db register` runs
as pgvpn_operator or a superuser, `pgvpn db revoke` as a superuser, since only a superuser may
take a login away from a role and end its sessions whoever it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
