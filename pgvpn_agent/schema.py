"""Versioned schema migrations for the `pgvpn` schema.

Migrations are plain SQL files shipped in the package (`migrations/NNNN_name.sql`) and applied
in order, each in its own transaction, under an advisory lock so that two installers racing
(two Ansible hosts, an agent and an operator) apply each file exactly once.
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


def migrate(conn: psycopg.Connection[Any], owner: str | None = None) -> list[int]:
    """Bring the schema to LATEST; returns the versions applied (empty when already there)."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS pgvpn")
        if owner:
            conn.execute(sql.SQL("ALTER SCHEMA pgvpn OWNER TO {}").format(sql.Identifier(owner)))
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
        for m in migrations()[version:]:
            log.info("applying migration %04d_%s", m.version, m.name)
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute(
                    "INSERT INTO pgvpn.schema_version (version, name) VALUES (%s, %s)",
                    (m.version, m.name),
                )
            applied.append(m.version)
        conn.execute("SELECT pgvpn.ensure_partitions()")
    return applied


def check_version(conn: psycopg.Connection[Any]) -> None:
    """Refuse to run against a schema this agent was not written for."""
    version = current_version(conn)
    if version != LATEST:
        raise RuntimeError(
            f"database schema is at version {version}, this agent needs {LATEST}: "
            "run `pgvpn db migrate` on the database host"
        )
