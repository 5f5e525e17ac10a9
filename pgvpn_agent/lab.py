"""`pgvpn lab`: the whole tunnel on one machine, for trying it, the tests and the benchmark.

A throwaway PostgreSQL cluster (initdb in a work dir, reachable only through its unix socket,
which every network namespace shares because the filesystem is shared) and N network namespaces,
each running one agent. State lives in `<workdir>/lab.json` so `up`, `status` and `down` can be
separate processes; the tests and the benchmark drive the same class.
"""

from __future__ import annotations

import fcntl
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pgvpn_agent import seal

DEFAULT_DIR = Path(os.environ.get("PGVPN_LAB_DIR", "/run/pgvpn-lab"))
PG_BIN_CANDIDATES = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin",
                     "/usr/lib/postgresql/15/bin")
PG_SETTINGS = {
    "listen_addresses": "''",
    "max_connections": "100",
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
# Management links (root namespace <-> each peer's namespace) carry the agents' metrics, so that
# a Prometheus in the root namespace can scrape them. Each lab takes a free /23 of link-local
# space: a /31 per peer, root side even, namespace side odd.
MGMT_SPACE = ipaddress.ip_network("169.254.0.0/16")
MGMT_FIRST_OCTET = 76
MGMT_IF = "mgmt0"
MGMT_LOCK = "/run/pgvpn-lab-mgmt.lock"
METRICS_PORT = 9478
# The housekeeping service's metrics, in the root namespace: the database's port - this, below
# the kernel's ephemeral ports (32768-60999), where a connect to a port nobody listens on yet
# can meet itself (TCP self-connect) and read its own request back.
HOUSEKEEPING_PORT_OFFSET = 30000
HOUSEKEEPING_ROLE = "pgvpn_housekeeping"
# What a peer's login may use on the database server that its own SET cannot raise.
PEER_ROLE_SETTINGS = {"temp_file_limit": "64MB"}


class LabError(RuntimeError):
    """The lab could not be brought up; the message says what to install or clean."""


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

    def dsn(self, user: str = "postgres") -> str:
        return f"host={self.sockdir} port={self.port} dbname=pgvpn user={user}"

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, workdir: Path = DEFAULT_DIR, *, peers: int = 2, mode: str = "logged",
               batch_max: int | None = None, mtu: int = 1500, prefix: str = "pgvpn-lab",
               port: int = 55432, transport: dict[str, Any] | None = None,
               encrypt: bool = False, offload: bool = True, schema: int = 0, tcp: bool = False,
               pg_settings: dict[str, str] | None = None) -> Lab:
        if (workdir / "lab.json").exists():
            raise LabError(f"a lab is already up in {workdir}: run `pgvpn lab down` first")
        if peers < 2 or peers > 200:
            raise LabError("--peers must be between 2 and 200")
        tr = dict(transport or {})
        if batch_max is not None:
            tr["batch_max"] = batch_max
        lab = cls(workdir=workdir, prefix=prefix, port=port, mode=mode, transport=tr, mtu=mtu,
                  pg_bin=_pg_bin(), encrypt=encrypt, offload=offload and mode != "payload",
                  schema=schema, tcp=tcp, pg_settings=dict(pg_settings or {}))
        for i in range(1, peers + 1):
            lab.peers.append(LabPeer(
                name=f"peer{i}", netns=f"{prefix}{i}", ipv4=f"10.77.{i // 250}.{i % 250}",
                ipv6=f"fd77::{i:x}", tun="pgvpn0", config=str(workdir / f"peer{i}.toml"),
                log=str(workdir / f"peer{i}.log")))
        return lab

    def up(self, timeout: float = 60.0, agents: bool = True) -> None:
        """Start everything and return once every peer pings every other one (v4 and v6).

        With agents=False only the database comes up (and each peer's config file is written),
        for tests that drive senders and receivers themselves.
        """
        for tool in ("ip", "ping", "runuser"):
            if shutil.which(tool) is None:
                raise LabError(f"`{tool}` is not installed (apt-get install iproute2 iputils-ping)")
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
                self.wait_mesh(timeout)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove every process, namespace and file this lab made; safe to call twice."""
        for peer in self.peers:
            self.stop_agent(peer)
        self.stop_housekeeping()
        if (self.datadir / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate", check=False)
        existing = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout.split())
        for peer in self.peers:
            if peer.netns in existing:
                # the management veth goes first: from inside, it can only be this lab's
                _run(["ip", "-n", peer.netns, "link", "del", MGMT_IF], check=False)
                _run(["ip", "netns", "del", peer.netns], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

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
                       "tun": p.tun, "pid": p.pid, "running": _alive(p.pid),
                       "dsn": self.dsn(_role(p.name)), "log": p.log,
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
            settings = {**PG_SETTINGS, **self.pg_settings}
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

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        self._as_postgres([f"{self.pg_bin}/pg_ctl", "-D", str(self.datadir), *args], check=check)

    def _as_postgres(self, cmd: list[str], check: bool = True) -> None:
        proc = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True,
                              text=True, cwd="/")
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
                role = _role(peer.name)
                conn.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 8 IN ROLE pgvpn_agent')
                for key, value in PEER_ROLE_SETTINGS.items():
                    conn.execute(f"ALTER ROLE \"{role}\" SET {key} = '{value}'")
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
        (keep_days=7, on_disk_full="drop_oldest", ...) replace the lab's and restart it."""
        if options:
            self.stop_housekeeping()
            self.housekeeping = {**self.housekeeping, **options}
        args = [sys.executable, "-m", "pgvpn_agent", "db", "housekeeping",
                "--dsn", self.dsn(HOUSEKEEPING_ROLE), "--metrics-address", "127.0.0.1",
                "--metrics-port", str(self.housekeeping_port)]
        for key, value in self.housekeeping.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        log = open(self.housekeeping_log, "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd="/",
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()
        self.housekeeping_pid = proc.pid
        self.save()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.housekeeping_metrics()
                return
            except LabError:
                if not _alive(proc.pid) or time.monotonic() > deadline:
                    raise LabError("the housekeeping service did not come up; "
                                   f"{self.housekeeping_log}:\n"
                                   + _tail(str(self.housekeeping_log))) from None
                time.sleep(0.1)

    def stop_housekeeping(self) -> None:
        _stop(self.housekeeping_pid)

    def housekeeping_metrics(self) -> dict[str, float]:
        return _scrape(f"http://127.0.0.1:{self.housekeeping_port}/metrics",
                       "the housekeeping service")

    # -- agents --------------------------------------------------------------------------------

    def write_config(self, peer: LabPeer) -> None:
        database = [f'dsn = "{self.dsn(_role(peer.name))}"']
        if self.tcp:
            database = [f'dsn = "host={peer.mgmt_host} port={self.port} dbname=pgvpn '
                        f'user={_role(peer.name)}"', "allow_plaintext = true",
                        'sslmode = "disable"']
        lines = [f'peer = "{peer.name}"', f'mode = "{self.mode}"', "", "[database]", *database,
                 "", "[tun]", f'name = "{peer.tun}"',
                 f"mtu = {self.mtu}", f"offload = {json.dumps(self.offload)}", "",
                 "[transport]"]
        transport = dict(self.transport)
        transport.setdefault("state_file", str(self.workdir / f"{peer.name}.state.json"))
        if self.mode == "payload":
            # the lab's database is this machine's, its roles the lab's own: nobody else listens
            transport.setdefault("allow_payload_mode", True)
        lines += [f"{k} = {json.dumps(v)}" for k, v in transport.items()]
        lines += ["", "[metrics]", "enabled = true", f'address = "{peer.metrics_host}"',
                  f"port = {METRICS_PORT}", ""]
        if self.encrypt:
            lines += ["[encryption]", f'keys_file = "{self.keys_file(peer)}"', ""]
        for p in self.peers:
            lines += ["[[peers]]", f'name = "{p.name}"',
                      f'addresses = ["{p.ipv4}/16", "{p.ipv6}/64"]', ""]
        Path(peer.config).write_text("\n".join(lines))

    def keys_file(self, peer: LabPeer) -> Path:
        return self.workdir / f"{peer.name}.keys"

    def write_keys(self) -> None:
        """One key per pair of peers, each peer's file holding the keys of its links."""
        tables: dict[str, list[str]] = {p.name: [] for p in self.peers}
        for i, a in enumerate(self.peers):
            for b in self.peers[i + 1:]:
                key = seal.new_key()
                tables[a.name] += [f"[keys.{b.name}]", f'1 = "{key}"']
                tables[b.name] += [f"[keys.{a.name}]", f'1 = "{key}"']
        for peer in self.peers:
            path = self.keys_file(peer)
            path.touch(mode=0o600)
            path.write_text("\n".join(tables[peer.name]) + "\n")

    def add_namespaces(self) -> None:
        """Each peer's namespace, and a management veth pair into it from the root namespace
        for its metrics endpoint; labs starting side by side take turns to pick addresses."""
        with open(MGMT_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            block = _free_mgmt_block()
            tag = block.network_address.packed[2]
            for i, peer in enumerate(self.peers):
                host = block.network_address + 2 * i
                peer.mgmt_if = f"pgvm{tag}-{i + 1}"
                peer.mgmt_host, peer.metrics_host = str(host), str(host + 1)
                _run(["ip", "netns", "add", peer.netns])
                _run(["ip", "-n", peer.netns, "link", "set", "lo", "up"])
                self.add_mgmt_link(peer)
        self.save()

    def add_mgmt_link(self, peer: LabPeer) -> None:
        _run(["ip", "link", "add", peer.mgmt_if, "type", "veth", "peer", "name", MGMT_IF,
              "netns", peer.netns])
        _run(["ip", "addr", "add", f"{peer.mgmt_host}/31", "dev", peer.mgmt_if])
        _run(["ip", "link", "set", peer.mgmt_if, "up"])
        _run(["ip", "-n", peer.netns, "addr", "add", f"{peer.metrics_host}/31", "dev", MGMT_IF])
        _run(["ip", "-n", peer.netns, "link", "set", MGMT_IF, "up"])

    def start_agent(self, peer: LabPeer, env: dict[str, str] | None = None) -> None:
        """Start a peer's agent in its namespace; `env` adds to its environment (a test's
        libfaketime, say)."""
        log = open(peer.log, "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        proc = subprocess.Popen(
            ["ip", "netns", "exec", peer.netns, sys.executable, "-m", "pgvpn_agent", "run",
             "--config", peer.config],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, cwd="/")
        log.close()
        peer.pid = proc.pid
        self.save()

    def stop_agent(self, peer: LabPeer, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        _stop(peer.pid, sig, timeout)

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
              reverse: bool = False) -> dict[str, Any]:
        """iperf3 TCP from src to dst through the tunnel; returns iperf3's JSON report."""
        server = subprocess.Popen(
            ["ip", "netns", "exec", dst.netns, "iperf3", "-s", "-1", "-B", dst.ipv4],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):
                if self.exec(dst, ["ss", "-ltn", f"src {dst.ipv4}:5201"]).stdout.count("LISTEN"):
                    break
                time.sleep(0.1)
            cmd = ["iperf3", "-J", "-c", dst.ipv4, "-t", str(seconds), "-P", str(streams)]
            out = self.exec(src, cmd + (["-R"] if reverse else []), timeout=seconds + 60)
            report: dict[str, Any] = json.loads(out.stdout or "{}")
            if out.returncode != 0 or "error" in report:
                raise LabError(f"iperf3 failed: {report.get('error', out.stderr.strip())}")
            return report
        finally:
            server.kill()
            server.wait()

    def agent_metrics(self, peer: LabPeer) -> dict[str, float]:
        """The agent's Prometheus samples, keyed by sample name with labels."""
        return _scrape(peer.metrics_url, peer.name)

    def wait_mesh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        todo = [(a, b, v6) for a in self.peers for b in self.peers if a is not b
                for v6 in (False, True)]
        while todo:
            for peer in self.peers:
                if not _alive(peer.pid):
                    raise LabError(f"agent {peer.name} exited; see {peer.log}:\n"
                                   + _tail(peer.log))
            todo = [t for t in todo if not self.ping(*t)]
            if todo and time.monotonic() > deadline:
                a, b, v6 = todo[0]
                raise LabError(f"{a.name} cannot ping {b.name} ({'v6' if v6 else 'v4'}) after "
                               f"{timeout:.0f}s; agent log {a.log}:\n" + _tail(a.log))


def _scrape(url: str, what: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise LabError(f"cannot scrape metrics of {what}: {exc}") from exc
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def _stop(pid: int, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if not _alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)


def _role(peer: str) -> str:
    return "pgvpn_" + peer.replace("-", "_").replace(".", "_").lower()


def _free_mgmt_block() -> ipaddress.IPv4Network:
    """The first /23 of MGMT_SPACE that no address or interface name in the root namespace
    uses."""
    addrs = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                           text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    used = {ipaddress.ip_address(a) for a in re.findall(r"inet ([0-9.]+)/", addrs)}
    names = set(re.findall(r"^\d+: (pgvm\d+)-", links, re.MULTILINE))
    for third in range(MGMT_FIRST_OCTET, 256, 2):
        block = ipaddress.IPv4Network(f"169.254.{third}.0/23")
        # 169.254.169.254 is the cloud metadata address: never shadow it
        if third != 168 and f"pgvm{third}" not in names and not any(a in block for a in used):
            return block
    raise LabError(f"no free /23 left in {MGMT_SPACE} for the management links")


def _pg_bin() -> str:
    for candidate in PG_BIN_CANDIDATES:
        if os.path.exists(f"{candidate}/initdb"):
            return candidate
    raise LabError("PostgreSQL server binaries not found: apt-get install postgresql")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return _state(pid) != "Z"
    return done == 0


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run(cmd: list[str], check: bool = True) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
