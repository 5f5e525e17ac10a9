"""Connections to PostgreSQL: one place for session settings and the reconnect backoff."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import psycopg

from pgvpn_agent import wire
from pgvpn_agent.config import Database

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]

# Advisory lock namespace: (this, peer id) is held by the agent of that peer, one per direction,
# so a second agent started with the same peer name waits instead of interleaving packets.
LOCK_SENDER = 0x7076_0001
LOCK_RECEIVER = 0x7076_0002


class AlreadyRunning(RuntimeError):
    """Another agent with the same peer name holds the link."""


def connect_kwargs(database: Database, application_name: str,
                   synchronous_commit: bool = True) -> dict[str, Any]:
    """Arguments for psycopg.connect, shared by single connections and the housekeeping pool.

    Parallel workers turn every small indexed tail read into a 3x slower gather, so the agent
    switches them off for its own sessions whatever the server default is. Its statements run
    thousands of times a second with the same shape: under the default plan_cache_mode the
    server re-planned the receiver's fetch on every wake-up (a quarter of its CPU).
    """
    return {
        "conninfo": database.dsn,
        "password": database.password(),
        "connect_timeout": max(1, round(database.connect_timeout)),
        "application_name": application_name,
        "autocommit": True,
        "options": "-c max_parallel_workers_per_gather=0 -c plan_cache_mode=force_generic_plan"
        + ("" if synchronous_commit else " -c synchronous_commit=off"),
        **database.tls(),
    }


def connect(database: Database, application_name: str, synchronous_commit: bool = True) -> Conn:
    """An autocommit session that knows the agent's binary array types."""
    try:
        conn = psycopg.connect(**connect_kwargs(database, application_name, synchronous_commit))
    except psycopg.OperationalError as exc:
        hint = tls_hint(database, str(exc))
        if hint:
            raise psycopg.OperationalError(f"{describe(exc)} ({hint})") from exc
        raise
    wire.register(conn)
    return conn


def tls_hint(database: Database, message: str) -> str:
    """Name the config key behind a TLS failure: libpq's message names neither."""
    if "certificate verify failed" in message:
        return (f"database.sslrootcert: the server's certificate is not signed by the CA in "
                f"{database.sslrootcert}")
    if "does not match host name" in message:
        return ("database.dsn: the server's certificate does not name this host; connect by a "
                "name or address that the certificate lists")
    if "no pg_hba.conf entry" in message and "no encryption" in message:
        return "the server accepts TLS connections only: set database.sslmode = \"verify-full\""
    return ""


def lock_peer(conn: Conn, namespace: int, peer_id: int, peer: str) -> None:
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (namespace, peer_id)).fetchone()
    if not row or not row[0]:
        raise AlreadyRunning(
            f"another pgvpn agent is connected as peer {peer!r}; each peer name must run once"
        )


def register(conn: Conn, names: list[str]) -> dict[str, int]:
    """Make sure every configured peer and link exists; returns name -> id."""
    rows = conn.execute("SELECT name, id FROM pgvpn.register_peers(%s::text[])", (names,))
    return {str(name): int(pid) for name, pid in rows}


class Backoff:
    """Exponential backoff with jitter: quick first retries, bounded waits, no thundering herd."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0
        self.next_at = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.next_at

    def wait_time(self) -> float:
        return max(0.0, self.next_at - time.monotonic())

    def failed(self) -> float:
        delay = min(self.cap, self.first * 2.0**self.attempt) * random.uniform(0.5, 1.0)
        self.attempt += 1
        self.next_at = time.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        self.attempt = 0
        self.next_at = 0.0


def describe(exc: BaseException) -> str:
    """One line for the log: libpq messages span lines and repeat the host."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
