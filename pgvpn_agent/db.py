"""Connections to PostgreSQL: one place for session settings and the reconnect backoff."""

from __future__ import annotations

import logging
import random
import secrets
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgvpn_agent import wire
from pgvpn_agent.config import Database

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]

# The agent of a peer holds one lock per direction, so a second agent started with the same
# peer name is refused instead of interleaving packets. pgvpn.lock_peer() takes it, keyed on the
# caller's own peer id: peers may not take advisory locks themselves (schema v11).
LOCK_SENDER = 1
LOCK_RECEIVER = 2
_DIRECTIONS = {LOCK_SENDER: "sender", LOCK_RECEIVER: "receiver"}


class AlreadyRunning(RuntimeError):
    """Another agent with the same peer name holds the link."""


def connect_kwargs(database: Database, application_name: str, synchronous_commit: bool = True,
                   any_server: bool = False) -> dict[str, Any]:
    """Arguments for psycopg.connect, shared by single connections and the housekeeping pool.

    Parallel workers turn every small indexed tail read into a 3x slower gather, so the agent
    switches them off for its own sessions whatever the server default is. Its statements run
    thousands of times a second with the same shape: under the default plan_cache_mode the
    server re-planned the receiver's fetch on every wake-up (a quarter of its CPU).
    """
    dead = database.dead_path_timeout
    # Only a primary takes writes: with several hosts (host=db1,db2,db3) libpq tries each in
    # turn and keeps the one that does; with one, a standby (a demoted primary behind the same
    # name) is refused at connect instead of failing every batch. The database host's own
    # services (any_server) watch their node whatever its role, and check the role themselves.
    session = ({} if "target_session_attrs" in conninfo_to_dict(database.dsn)
               else {"target_session_attrs": "any" if any_server else "read-write"})
    return {
        "conninfo": database.dsn,
        **session,
        # A silent path is noticed within dead_path_timeout whether the agent is idle (LISTEN),
        # waits for a result (keepalive probes: idle 40 %, then 3 probes 20 % apart) or has
        # data in flight (tcp_user_timeout); libpq's defaults take the kernel's 2 h 11 min.
        "keepalives": 1,
        "keepalives_idle": max(1, round(dead * 0.4)),
        "keepalives_interval": max(1, round(dead * 0.2)),
        "keepalives_count": 3,
        "tcp_user_timeout": int(dead * 1000),
        "password": database.password(),
        "connect_timeout": max(1, round(database.connect_timeout)),
        "application_name": application_name,
        "autocommit": True,
        # A commit the sender saw must be durable whatever a role or database setting says
        # (a function's own SET would be undone before its commit reads it).
        "options": "-c max_parallel_workers_per_gather=0 -c plan_cache_mode=force_generic_plan"
        + (" -c synchronous_commit=on" if synchronous_commit else " -c synchronous_commit=off"),
        **database.tls(),
    }


# The host each session (by application name) last reached: when that session connects again,
# the host that just failed it is tried last (see _last_tried_last).
_reached: dict[str, tuple[str, str]] = {}


def connect(database: Database, application_name: str, synchronous_commit: bool = True,
            any_server: bool = False) -> Conn:
    """An autocommit session that knows the agent's binary array types."""
    kwargs = connect_kwargs(database, application_name, synchronous_commit, any_server)
    kwargs["conninfo"] = _last_tried_last(kwargs["conninfo"], _reached.get(application_name))
    try:
        conn = psycopg.connect(**kwargs)
    except psycopg.OperationalError as exc:
        hint = tls_hint(database, str(exc))
        if hint:
            raise psycopg.OperationalError(f"{describe(exc)} ({hint})") from exc
        raise
    wire.register(conn)
    _reached[application_name] = (conn.info.host, str(conn.info.port))
    return conn


def _last_tried_last(conninfo: str, failed: tuple[str, str] | None) -> str:
    """The conninfo with the host a session just lost moved to the end of its host list.

    libpq (psycopg) tries hosts in order, each for up to connect_timeout: after a failover the
    old primary, powered off or cut off, would cost that timeout at every reconnect before the
    new primary is even asked. Still tried, last: a connection lost on a path that heals is
    taken again at the end of the same round.
    """
    params = conninfo_to_dict(conninfo)
    hosts = str(params.get("host", "")).split(",")
    if failed is None or len(hosts) < 2:
        return conninfo
    columns = {key: str(params[key]).split(",") for key in ("host", "hostaddr", "port")
               if key in params}
    if any(len(values) not in (1, len(hosts)) for values in columns.values()):
        return conninfo  # libpq refuses it and says why
    ports = columns.get("port", [""]) * (len(hosts) if len(columns.get("port", [])) <= 1 else 1)
    order = sorted(range(len(hosts)),
                   key=lambda i: (hosts[i], ports[i] or "5432") == (failed[0], failed[1]))
    for key, values in columns.items():
        if len(values) == len(hosts):
            params[key] = ",".join(values[i] for i in order)
    return make_conninfo("", **params)


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


# This process, to the database: a lock held under it is this agent's own session from before a
# reconnect (pgvpn.lock_peer()).
TOKEN = secrets.token_hex(8)


def lock_peer(conn: Conn, direction: int, peer: str) -> None:
    """Take this peer's lock for one direction, ending this process's own stale session.

    After a dead path the server keeps the old session, and its lock, until it notices (its
    keepalives): the reconnecting agent ends that session itself rather than wait.
    """
    for _ in range(3):
        row = conn.execute("SELECT pgvpn.lock_peer(%s::int2, %s)",
                           (direction, TOKEN)).fetchone()
        holder = int(row[0]) if row else 0
        if holder < 0:
            return
        if holder == 0:
            break
        log.warning("%s: ending this agent's own database session %d, left behind on a dead "
                    "path, which still holds peer %s's lock", _DIRECTIONS[direction], holder,
                    peer)
        conn.execute("SELECT pg_terminate_backend(%s, 2000)", (holder,))
    raise AlreadyRunning(
        f"another pgvpn agent is connected as peer {peer!r}; each peer name must run once"
    )


class NotRegistered(RuntimeError):
    """This agent's peer is not (or no longer) in pgvpn.peer."""


def peer_ids(conn: Conn, me: str, names: list[str]) -> dict[str, int]:
    """name -> id of the configured peers the operator registered; this agent's own must be.

    Agents do not register peers (a peer's login may not): the operator does, with
    `pgvpn db register` or site.yml. A configured peer missing from the database is left out,
    and packets routed to it are counted as no_route, so the others keep working.
    """
    rows = conn.execute("SELECT name, id FROM pgvpn.peer WHERE name = ANY (%s::text[]) "
                        "AND revoked_at IS NULL", (names,))
    ids = {str(name): int(pid) for name, pid in rows}
    if me not in ids:
        raise NotRegistered(
            f"peer {me!r} is not registered in the database, or was revoked: the operator "
            f"registers peers with `pgvpn db register` (site.yml does it for its inventory)")
    missing = sorted(set(names) - set(ids))
    if missing:
        log.warning("peers %s of this agent's config are not registered in the database; "
                    "packets routed to them are dropped as no_route", ", ".join(missing))
    return ids


class Backoff:
    """Exponential backoff with jitter: quick first retries, bounded waits, no thundering herd."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
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
