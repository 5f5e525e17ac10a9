"""A streaming standby of a lab's cluster (pg_basebackup), synchronous: the failover tests and
`pgvpn bench mesh --standby` (every commit waits for the standby's flush as well)."""

from __future__ import annotations

import time

from pgvpn_agent.lab import Lab, LabError


def sync_standbys(lab: Lab, names: str | None) -> None:
    """Set the lab's synchronous_standby_names (None: reset it) and reload: commits wait for
    those standbys a moment later (a name no standby has: they wait until it is reset)."""
    lab.psql("ALTER SYSTEM RESET synchronous_standby_names" if names is None
             else f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
    lab.psql("SELECT pg_reload_conf()")


class Standby:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.datadir = lab.standby_dir
        self.port = lab.port + 1000
        self.log = lab.pgdir / "standby.log"

    def dsn(self, user: str = "postgres") -> str:
        return f"host={self.lab.sockdir} port={self.port} dbname=pgvpn user={user}"

    def create(self, timeout: float = 30.0) -> None:
        """Copy the primary, start the copy and make it the synchronous standby; returns once
        the primary reports it `sync`."""
        lab = self.lab
        lab._as_postgres([f"{lab.pg_bin}/pg_basebackup", "-h", str(lab.sockdir), "-p",
                          str(lab.port), "-U", "postgres", "-D", str(self.datadir), "-R",
                          "-X", "stream", "--no-sync", "--checkpoint=fast"])
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {self.port}\n")
        self.start()
        sync_standbys(lab, "*")
        deadline = time.monotonic() + timeout
        while (state := lab.psql("SELECT sync_state FROM pg_stat_replication")) != "sync":
            if time.monotonic() > deadline:
                raise LabError(f"the standby is not synchronous after {timeout:.0f}s "
                               f"(pg_stat_replication.sync_state: {state or 'no row'}); "
                               f"see {self.log}")
            time.sleep(0.2)

    def promote(self) -> None:
        self.lab.pg_ctl(self.datadir, "promote", "-w", "-t", "60")

    def start(self) -> None:
        """Under the lab's database clock, if it has one (its primary's)."""
        self.lab.pg_ctl(self.datadir, "start", "-w", "-t", "60", "-l", str(self.log))

    def stop(self, mode: str = "immediate") -> None:
        self.lab.pg_ctl(self.datadir, "stop", "-m", mode, check=False)
