"""A streaming standby of the lab's cluster (pg_basebackup), synchronous, promoted by hand as
Patroni would: the failover tests and the replication metrics test share it."""

from __future__ import annotations

import re
from pathlib import Path

from pgvpn_agent.lab import Lab, LabPeer
from tests.integration.stream import eventually


class Standby:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.datadir = lab.pgdir / "standby"
        self.port = lab.port + 1000
        self.log = lab.pgdir / "standby.log"

    def dsn(self, user: str = "postgres") -> str:
        return f"host={self.lab.sockdir} port={self.port} dbname=pgvpn user={user}"

    def create(self) -> None:
        lab = self.lab
        lab._as_postgres([f"{lab.pg_bin}/pg_basebackup", "-h", str(lab.sockdir), "-p",
                          str(lab.port), "-U", "postgres", "-D", str(self.datadir), "-R",
                          "-X", "stream", "--no-sync", "--checkpoint=fast"])
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {self.port}\n")
        self.start()
        lab.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        lab.psql("SELECT pg_reload_conf()")
        eventually(lambda: _equal(lab.psql(
            "SELECT sync_state FROM pg_stat_replication"), "sync"), timeout=30)

    def promote(self) -> None:
        self.lab._as_postgres([f"{self.lab.pg_bin}/pg_ctl", "-D", str(self.datadir), "promote",
                               "-w", "-t", "60"])

    def start(self) -> None:
        self.lab._as_postgres([f"{self.lab.pg_bin}/pg_ctl", "-D", str(self.datadir), "start",
                               "-w", "-t", "60", "-l", str(self.log)])

    def stop(self, mode: str = "immediate") -> None:
        self.lab._as_postgres([f"{self.lab.pg_bin}/pg_ctl", "-D", str(self.datadir), "stop",
                               "-m", mode], check=False)


def both_servers(lab: Lab, peer: LabPeer, standby: Standby) -> None:
    """The agent's dsn names the primary and the standby, in that order."""
    path = Path(peer.config)
    text = path.read_text()
    path.write_text(re.sub(rf"host=(\S+) port={lab.port} ",
                           rf"host=\1,\1 port={lab.port},{standby.port} ", text))


def with_standby(lab: Lab, standby: Standby) -> None:
    """The standby made, and every agent started with a dsn naming both servers."""
    standby.create()
    for peer in lab.peers:
        both_servers(lab, peer, standby)
        lab.start_agent(peer)
    lab.wait_mesh(timeout=30)


def _equal(value: object, expected: object) -> None:
    assert value == expected, value
