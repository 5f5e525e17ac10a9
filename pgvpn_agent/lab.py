"""`pgvpn lab`: the whole tunnel on one machine, for trying it, the tests and the benchmark.

A throwaway PostgreSQL cluster (initdb in a work dir, reachable only through its unix socket,
which every network namespace shares because the filesystem is shared) and N network namespaces,
each running one agent. State lives in `<workdir>/lab.json` so `up`, `status` and `down` can be
separate processes; the tests and the benchmark drive the same class.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pgvpn_agent import labconfig, labmemory, labsize, labtraffic
from pgvpn_agent.labconfig import METRICS_PORT
from pgvpn_agent.labhost import (
    MGMT_IF,
    MGMT_SPACE,
    LabError,
    add_namespace,
    alive,
    claim_namespaces,
    mgmt_block,
    namespaces,
    pg_bin,
    remove_namespace,
    role,
    scrape,
    spawn,
    stop,
    tail,
)
from pgvpn_agent.labhost import run as _run

__all__ = ["DEFAULT_DIR", "HOUSEKEEPING_ROLE", "METRICS_PORT", "MGMT_IF", "Lab", "LabError",
           "LabPeer", "_run"]

DEFAULT_DIR = Path(os.environ.get("PGVPN_LAB_DIR", "/run/pgvpn-lab"))
# Debian's faketime package: a process's clock offset from the host's (tests, bench)
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
CLOCK_CACHE = 1  # seconds a server process keeps the offset it read
PG_SETTINGS = {
    "listen_addresses": "''",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    # pg_wal full is a PANIC: no replication slot may keep more than this beyond max_wal_size
    # (the Ansible role sets the same bound)
    "max_slot_wal_keep_size": "1GB",
    "wal_keep_size": "0",
    "checkpoint_timeout": "15min",
    "synchronous_commit": "on",
    "fsync": "on",
    # A fresh cluster writes every WAL segment for the first time, zero-filling 16 MB before
    # using it; a long-running server recycles old segments instead. Without this the lab and
    # the benchmark would measure that first-use cost (~5 % of the tunnel's throughput).
    "wal_init_zero": "off",
    "logging_collector": "off",
    # A client gone silent is noticed within ~10 s, its backend (and the agent's lock) ended, as
    # the Ansible role sets it (DESIGN.md trap 18).
    "tcp_keepalives_idle": "4",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "client_connection_check_interval": "5000",
}
# The housekeeping service's metrics, in the root namespace: the database's port - this, below
# the kernel's ephemeral ports (32768-60999), where a connect to a port nobody listens on yet
# can meet itself (TCP self-connect) and read its own request back.
HOUSEKEEPING_PORT_OFFSET = 30000
HOUSEKEEPING_ROLE = "pgvpn_housekeeping"
# What a peer's login may use on the database server that its own SET cannot raise.
PEER_ROLE_SETTINGS = {"temp_file_limit": "64MB"}


@dataclass
class LabPeer:
    name: str
    netns: str
    ipv4: str
    ipv6: str
    tun: str
    config: str
    log: str
    pid: int = 0
    mgmt_if: str = ""
    mgmt_host: str = ""
    metrics_host: str = ""

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_host}:{METRICS_PORT}/metrics" if self.metrics_host else ""


@dataclass
class Lab:
    workdir: Path = DEFAULT_DIR
    prefix: str = "pgvpn-lab"
    peers: list[LabPeer] = field(default_factory=list)
    port: int = 55432
    mode: str = "logged"
    pg_bin: str = ""
    transport: dict[str, Any] = field(default_factory=dict)
    mtu: int = 1500
    encrypt: bool = False
    offload: bool = True  # TUN offload (the agent's default; payload mode never has it)
    join_bursts: bool = True  # tun.join_bursts (bursts.py)
    # `pgvpn db housekeeping` options (keep_days, max_size, on_disk_full, min_free,
    # max_transaction), and its process
    housekeeping: dict[str, Any] = field(default_factory=dict)
    housekeeping_pid: int = 0
    # 0: the latest schema; an earlier version, for upgrade tests (no housekeeping before 11)
    schema: int = 0
    # Agents reach PostgreSQL over TCP through their management link (plaintext) instead of
    # its unix socket: for tests of what a network path does.
    tcp: bool = False
    pg_settings: dict[str, str] = field(default_factory=dict)
    # PostgreSQL's clock runs under libfaketime, its offset from the host's read from
    # `db_clock_file` (set_db_clock): a bench takes the database across midnight without
    # touching the host's clock. None: the host's clock.
    db_clock: float | None = None
    # The cluster (and a standby) in a memory cgroup of this many MB (labmemory: a server's
    # steady state on a machine that hands free memory back to its host); 0: unconfined.
    db_memory_mb: int = 0

    @property
    def pgdir(self) -> Path:
        """Owned by the postgres user: socket, log and data directory."""
        return self.workdir / "pg"

    @property
    def sockdir(self) -> Path:
        return self.pgdir

    @property
    def datadir(self) -> Path:
        return self.pgdir / "data"

    @property
    def pglog(self) -> Path:
        return self.pgdir / "postgres.log"

    @property
    def standby_dir(self) -> Path:
        """Where labstandby.Standby keeps its copy of the cluster."""
        return self.pgdir / "standby"

    @property
    def db_cgroup(self) -> Path:
        """The cluster's memory cgroup (db_memory_mb), named after the lab's namespaces."""
        return labmemory.group(f"{self.prefix}db")

    @property
    def db_clock_file(self) -> Path:
        return self.workdir / "db-clock"

    def dsn(self, user: str = "postgres") -> str:
        return f"host={self.sockdir} port={self.port} dbname=pgvpn user={user}"

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, workdir: Path = DEFAULT_DIR, *, peers: int = 2, mode: str = "logged",
               batch_max: int | None = None, mtu: int = 1500, prefix: str = "pgvpn-lab",
               port: int = 55432, transport: dict[str, Any] | None = None,
               encrypt: bool = False, offload: bool = True, schema: int = 0, tcp: bool = False,
               pg_settings: dict[str, str] | None = None, join_bursts: bool = True,
               db_clock: float | None = None, db_memory_mb: int = 0) -> Lab:
        if (workdir / "lab.json").exists():
            raise LabError(f"a lab is already up in {workdir}: run `pgvpn lab down` first")
        labsize.check(peers)
        labmemory.check(db_memory_mb, peers)
        tr = dict(transport or {})
        if batch_max is not None:
            tr["batch_max"] = batch_max
        lab = cls(workdir=workdir, prefix=prefix, port=port, mode=mode, transport=tr, mtu=mtu,
                  pg_bin=pg_bin(), encrypt=encrypt, offload=offload and mode != "payload",
                  schema=schema, tcp=tcp, pg_settings=dict(pg_settings or {}),
                  join_bursts=join_bursts, db_clock=db_clock, db_memory_mb=db_memory_mb)
        for i in range(1, peers + 1):
            lab.peers.append(LabPeer(
                name=f"peer{i}", netns=f"{prefix}{i}", ipv4=f"10.77.{i // 250}.{i % 250}",
                ipv6=f"fd77::{i:x}", tun="pgvpn0", config=str(workdir / f"peer{i}.toml"),
                log=str(workdir / f"peer{i}.log")))
        return lab

    def up(self, timeout: float = 60.0, agents: bool = True) -> None:
        """Start everything and return once every peer pings every other one (v4 and v6; in
        a big lab, k random others: `wait_mesh`). Agents start at once and take about a second
        of CPU each: `timeout` gets a second per peer on top.

        With agents=False only the database comes up (and each peer's config file is written),
        for tests that drive senders and receivers themselves.
        """
        for tool in ("ip", "ping", "runuser"):
            if shutil.which(tool) is None:
                raise LabError(f"`{tool}` is not installed (apt-get install iproute2 iputils-ping)")
        claim_namespaces([p.netns for p in self.peers], self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.save()
        try:
            self.add_namespaces()
            self.start_postgres(init=True)
            self.init_database()
            if self.hardened:
                self.start_housekeeping()
            if self.encrypt:
                self.write_keys()
            for peer in self.peers:
                self.write_config(peer)
            for peer in self.peers if agents else []:
                self.start_agent(peer)
            self.save()
            if agents:
                self.wait_mesh(timeout + len(self.peers))
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove every process, namespace and file this lab made; safe to call twice."""
        for peer in self.peers:  # all at once: a big lab's agents stop side by side
            if alive(peer.pid):
                os.kill(peer.pid, signal.SIGTERM)
        for peer in self.peers:
            self.stop_agent(peer)
        self.stop_housekeeping()
        if (self.datadir / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate", check=False)
        if (self.standby_dir / "postmaster.pid").exists():  # a Standby still running
            self.pg_ctl(self.standby_dir, "stop", "-m", "immediate", check=False)
        existing = namespaces()
        for peer in self.peers:
            if peer.netns in existing:
                remove_namespace(peer.netns)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.db_memory_mb:  # last: a group still busy is the only thing left behind
            labmemory.remove(self.db_cgroup)

    def save(self) -> None:
        data = asdict(self)
        data["workdir"] = str(self.workdir)
        (self.workdir / "lab.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, workdir: Path = DEFAULT_DIR) -> Lab:
        try:
            data = json.loads((workdir / "lab.json").read_text())
        except FileNotFoundError:
            raise LabError(f"no lab is up in {workdir} (run `pgvpn lab up`)") from None
        data["workdir"] = Path(data["workdir"])
        data["peers"] = [LabPeer(**p) for p in data["peers"]]
        return cls(**data)

    def status(self) -> dict[str, Any]:
        return {
            "dsn": self.dsn(),
            "mode": self.mode,
            "peers": [{"name": p.name, "netns": p.netns, "ipv4": p.ipv4, "ipv6": p.ipv6,
                       "tun": p.tun, "pid": p.pid, "running": alive(p.pid),
                       "dsn": self.dsn(role(p.name)), "log": p.log,
                       "metrics_url": p.metrics_url} for p in self.peers],
        }

    # -- PostgreSQL ----------------------------------------------------------------------------

    def start_postgres(self, init: bool = False) -> None:
        if init:
            self.pgdir.mkdir(parents=True, exist_ok=True)
            shutil.chown(self.pgdir, "postgres", "postgres")
            self.workdir.chmod(0o755)
            self._as_postgres([f"{self.pg_bin}/initdb", "-D", str(self.datadir), "-U", "postgres",
                               "--auth=trust", "-E", "UTF8", "--no-sync"])
            settings = {**PG_SETTINGS,
                        "max_connections": str(labsize.max_connections(len(self.peers))),
                        **self.pg_settings}
            if self.tcp:
                settings["listen_addresses"] = "'*'"
                with open(self.datadir / "pg_hba.conf", "a") as f:
                    f.write(f"host all all {MGMT_SPACE} trust\n")
            with open(self.datadir / "postgresql.conf", "a") as f:
                for k, v in settings.items():
                    f.write(f"{k} = {v}\n")
                f.write(f"unix_socket_directories = '{self.sockdir}'\nport = {self.port}\n")
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.pglog))

    def restart_postgres(self, mode: str = "fast") -> None:
        self._pg_ctl("restart", "-w", "-m", mode, "-t", "60", "-l",
                     str(self.pglog))

    def stop_postgres(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-w", "-m", mode)

    def set_db_clock(self, offset: float) -> None:
        """Set PostgreSQL's clock `offset` seconds from the host's (a lab made with db_clock),
        for its servers started from now on and, within CLOCK_CACHE seconds, the running ones.
        A running server takes a step as it is (its timeouts measured by the wall clock see
        it): step a live one only by a few seconds, as the bench does. Monotonic clocks are
        left alone."""
        if self.db_clock is None:
            raise LabError("set_db_clock: this lab was not made with db_clock")
        self.db_clock = offset
        self.db_clock_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.db_clock_file.with_suffix(".new")
        tmp.write_text(f"{offset:+.3f}\n")
        tmp.chmod(0o644)
        tmp.replace(self.db_clock_file)

    def pg_ctl(self, datadir: Path, *args: str, check: bool = True) -> None:
        """pg_ctl as postgres on a cluster of this lab (the primary, a standby); under the
        lab's database clock if it has one."""
        cmd = [f"{self.pg_bin}/pg_ctl", "-D", str(datadir), *args]
        if self.db_clock is not None and args[0] in ("start", "restart"):
            if not self.db_clock_file.exists():
                self.set_db_clock(self.db_clock)
            cmd = ["env", f"LD_PRELOAD={LIBFAKETIME}",
                   f"FAKETIME_TIMESTAMP_FILE={self.db_clock_file}",
                   f"FAKETIME_CACHE_DURATION={CLOCK_CACHE}", "FAKETIME_DONT_FAKE_MONOTONIC=1",
                   *cmd]
        group = None
        if self.db_memory_mb and args[0] in ("start", "restart"):
            group = self.db_cgroup
            labmemory.create(group, self.db_memory_mb)
        self._as_postgres(cmd, check=check, cgroup=group)

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        self.pg_ctl(self.datadir, *args, check=check)

    def _as_postgres(self, cmd: list[str], check: bool = True,
                     cgroup: Path | None = None) -> None:
        full = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(labmemory.command(cgroup, full) if cgroup else full,
                              capture_output=True, text=True, cwd="/")
        if check and proc.returncode != 0:
            raise LabError(f"{' '.join(cmd[:2])} failed: {proc.stderr.strip() or proc.stdout}")

    def postmaster_pid(self) -> int:
        """The cluster's postmaster: the parent of every backend, for CPU accounting."""
        return int((self.datadir / "postmaster.pid").read_text().split()[0])

    def psql(self, query: str, user: str = "postgres") -> str:
        """Run SQL as a superuser (or a peer's role) and return unaligned output."""
        proc = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d",
                               self.dsn(user), "-c", query], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LabError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def init_database(self) -> None:
        subprocess.run(["psql", "-X", "-q", "-d", self.dsn().replace("dbname=pgvpn",
                        "dbname=postgres"), "-c", "CREATE DATABASE pgvpn"], check=True,
                       capture_output=True)
        from pgvpn_agent import db, schema
        from pgvpn_agent.config import Database

        with db.connect(Database(dsn=self.dsn()), "pgvpn-lab") as conn:
            schema.migrate(conn, target=self.schema or None)
            # As the Ansible role does: peers reach no other database, one login per peer,
            # a housekeeping login for the service on the database host, peers registered.
            for other in ("postgres", "template1"):
                conn.execute(f"REVOKE CONNECT ON DATABASE {other} FROM PUBLIC")
            for peer in self.peers:
                login = role(peer.name)
                conn.execute(f'CREATE ROLE "{login}" LOGIN CONNECTION LIMIT '
                             f'{labsize.PEER_CONNECTION_LIMIT} IN ROLE pgvpn_agent')
                for key, value in PEER_ROLE_SETTINGS.items():
                    conn.execute(f"ALTER ROLE \"{login}\" SET {key} = '{value}'")
            if self.hardened:
                self.add_housekeeping_role(conn)
            conn.execute("SELECT pgvpn.register_peers(%s)", ([p.name for p in self.peers],))

    @property
    def hardened(self) -> bool:
        from pgvpn_agent import schema

        return not self.schema or self.schema >= schema.HARDENED

    def add_housekeeping_role(self, conn: Any) -> None:
        conn.execute(f"CREATE ROLE {HOUSEKEEPING_ROLE} LOGIN "
                     "IN ROLE pgvpn_operator, pg_monitor, pg_signal_backend")

    # -- housekeeping --------------------------------------------------------------------------

    @property
    def housekeeping_port(self) -> int:
        return self.port - HOUSEKEEPING_PORT_OFFSET

    @property
    def housekeeping_log(self) -> Path:
        return self.workdir / "housekeeping.log"

    def start_housekeeping(self, **options: Any) -> None:
        """`pgvpn db housekeeping` as the Ansible role runs it next to PostgreSQL; options
        (keep_days=7, on_disk_full="drop_oldest", ...) replace the lab's. A running one is
        stopped first: a second would be left behind when the lab goes down."""
        self.stop_housekeeping()
        self.housekeeping = {**self.housekeeping, **options}
        args = [sys.executable, "-m", "pgvpn_agent", "db", "housekeeping",
                "--dsn", self.dsn(HOUSEKEEPING_ROLE), "--metrics-address", "127.0.0.1",
                "--metrics-port", str(self.housekeeping_port)]
        for key, value in self.housekeeping.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.housekeeping_pid = pid = spawn(args, str(self.housekeeping_log))
        self.save()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.housekeeping_metrics()
                return
            except LabError:
                if not alive(pid) or time.monotonic() > deadline:
                    raise LabError("the housekeeping service did not come up; "
                                   f"{self.housekeeping_log}:\n"
                                   + tail(str(self.housekeeping_log))) from None
                time.sleep(0.1)

    def stop_housekeeping(self) -> None:
        stop(self.housekeeping_pid)

    def housekeeping_metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.housekeeping_port}/metrics",
                       "the housekeeping service")

    # -- agents --------------------------------------------------------------------------------

    def write_config(self, peer: LabPeer) -> None:
        Path(peer.config).write_text(labconfig.agent_config(self, peer))

    def keys_file(self, peer: LabPeer) -> Path:
        return self.workdir / f"{peer.name}.keys"

    def write_keys(self) -> None:
        """One key per pair of peers, each peer's file holding the keys of its links."""
        texts = labconfig.keys_files([p.name for p in self.peers])
        for peer in self.peers:
            path = self.keys_file(peer)
            path.touch(mode=0o600)
            path.write_text(texts[peer.name])

    def add_namespaces(self) -> None:
        """Each peer's namespace, and a management veth pair into it from the root namespace
        for its metrics endpoint; labs starting side by side take turns to pick addresses."""
        with mgmt_block() as block:
            tag = block.network_address.packed[2]
            for i, peer in enumerate(self.peers):
                host = block.network_address + 2 * i
                peer.mgmt_if = f"pgvm{tag}-{i + 1}"
                peer.mgmt_host, peer.metrics_host = str(host), str(host + 1)
                add_namespace(peer.netns, peer.mgmt_if, peer.mgmt_host, peer.metrics_host)
        self.save()

    def start_agent(self, peer: LabPeer, env: dict[str, str] | None = None) -> None:
        """Start a peer's agent in its namespace; `env` adds to its environment (a test's
        libfaketime, say)."""
        peer.pid = spawn(["ip", "netns", "exec", peer.netns, sys.executable, "-m",
                          "pgvpn_agent", "run", "--config", peer.config], peer.log, env)
        self.save()

    def stop_agent(self, peer: LabPeer, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        stop(peer.pid, sig, timeout)

    def exec(self, peer: LabPeer, cmd: list[str],
             **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside a peer's namespace."""
        return subprocess.run(["ip", "netns", "exec", peer.netns, *cmd], capture_output=True,
                              text=True, **kwargs)

    def ping(self, src: LabPeer, dst: LabPeer, v6: bool = False, count: int = 1) -> bool:
        cmd = ["ping", "-n", "-q", "-c", str(count), "-W", "1", "-i", "0.2"]
        cmd += ["-6", dst.ipv6] if v6 else ["-4", dst.ipv4]
        return self.exec(src, cmd).returncode == 0

    def iperf(self, src: LabPeer, dst: LabPeer, seconds: float = 3, streams: int = 1,
              reverse: bool = False, bidir: bool = False,
              congestion: str | None = None) -> dict[str, Any]:
        """iperf3 TCP from src to dst through the tunnel; returns iperf3's JSON report."""
        return labtraffic.iperf(self, src, dst, seconds=seconds, streams=streams,
                                reverse=reverse, bidir=bidir, congestion=congestion)

    def agent_metrics(self, peer: LabPeer) -> dict[str, float]:
        """The agent's Prometheus samples, keyed by sample name with labels."""
        return scrape(peer.metrics_url, peer.name)

    def wait_mesh(self, timeout: float) -> None:
        """Return once every peer reaches every other one, v4 and v6, both ways; in a lab of
        more than labtraffic.FULL_CHECK peers, each peer and labtraffic.CHECKED_OTHERS random
        others."""
        deadline = time.monotonic() + timeout
        todo = labtraffic.mesh_checks(self.peers)
        while todo:
            for peer in self.peers:
                if not alive(peer.pid):
                    raise LabError(f"agent {peer.name} exited; see {peer.log}:\n"
                                   + tail(peer.log))
            todo = labtraffic.unreachable(self, todo)
            if todo and time.monotonic() > deadline:
                a, b, v6 = todo[0]
                raise LabError(f"{a.name} cannot ping {b.name} ({'v6' if v6 else 'v4'}) after "
                               f"{timeout:.0f}s ({len(todo)} of the checked paths fail); agent "
                               f"log {a.log}:\n" + tail(a.log))
