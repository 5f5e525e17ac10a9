"""Is this node the primary? Asked once a second by the database host's own services.

With Patroni every database host runs housekeeping, and only the primary's may work: a standby
refuses every write. Each instance keeps one session to its own node whatever the node's role
and asks pg_is_in_recovery(); the instance whose node is promoted starts its jobs at the next
check, without waiting for a connection pool's reconnect backoff.
"""

from __future__ import annotations

import logging

import psycopg

from pgvpn_agent import db
from pgvpn_agent.config import Database

log = logging.getLogger(__name__)


class NodeRole:
    def __init__(self, database: Database, application_name: str) -> None:
        self.database = database
        self.application_name = application_name
        self.conn: db.Conn | None = None
        self.primary: bool | None = None  # None: not known (no answer yet)

    def check(self) -> bool | None:
        """True on the primary, False on a standby; the last answer while the node is silent."""
        try:
            if self.conn is None or self.conn.closed:
                self.conn = db.connect(self.database, self.application_name, any_server=True)
            row = self.conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error as exc:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            log.debug("node role: %s", db.describe(exc))
            return self.primary
        primary = not (row and row[0])
        if primary != self.primary:
            log.info("this node is %s", "the primary: housekeeping runs" if primary
                     else "a standby: housekeeping waits until it is promoted")
        self.primary = primary
        return primary

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
