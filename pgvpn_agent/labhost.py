"""What `pgvpn lab` does on the host: run commands, stop its processes, scrape metrics, pick
addresses for the management links. No lab state here: `lab.py` holds that."""

from __future__ import annotations

import fcntl
import http.client
import ipaddress
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin",
                     "/usr/lib/postgresql/15/bin")
# Management links (root namespace <-> each peer's namespace) carry the agents' metrics, so that
# a Prometheus in the root namespace can scrape them. Each lab takes a free /23 of link-local
# space: a /31 per peer, root side even, namespace side odd.
MGMT_SPACE = ipaddress.ip_network("169.254.0.0/16")
MGMT_FIRST_OCTET = 76
MGMT_PEERS = 256  # /31s in a /23
MGMT_IF = "mgmt0"  # the namespace side
MGMT_LOCK = "/run/pgvpn-lab-mgmt.lock"


class LabError(RuntimeError):
    """The lab could not be brought up; the message says what to install or clean."""


def scrape(url: str, what: str) -> dict[str, float]:
    """Prometheus samples keyed by sample name with labels."""
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


def stop(pid: int, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if not alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.05)


def role(peer: str) -> str:
    """A peer's database login."""
    return "pgvpn_" + peer.replace("-", "_").replace(".", "_").lower()


def free_mgmt_block() -> ipaddress.IPv4Network:
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


@contextmanager
def mgmt_block() -> Iterator[ipaddress.IPv4Network]:
    """A free /23 for a lab's management links, held against labs starting beside it until
    its links exist."""
    with open(MGMT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield free_mgmt_block()


def namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                              text=True).stdout.split())


def remove_namespace(name: str) -> None:
    """The management veth goes first: from inside, it can only be this namespace's."""
    run(["ip", "-n", name, "link", "del", MGMT_IF], check=False)
    run(["ip", "netns", "del", name], check=False)


def claim_namespaces(names: list[str], workdir: Path) -> None:
    """Before a lab makes anything: a namespace of its name that processes still use belongs
    to another lab (same prefix, another work dir), which a failed start must not tear down;
    one nobody uses is a crashed lab's leftover, removed."""
    existing = namespaces()
    for name in names:
        if name not in existing:
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        if pids:
            raise LabError(f"network namespace {name} is in use by process {', '.join(pids)}: "
                           f"another lab with the same names is up; stop it (`pgvpn lab down "
                           f"--dir ITS_DIR`) before starting one in {workdir}")
        remove_namespace(name)


def add_namespace(netns: str, mgmt_if: str, mgmt_host: str, metrics_host: str) -> None:
    """A peer's namespace and its management veth pair (/31: root side `mgmt_host`)."""
    run(["ip", "netns", "add", netns])
    run(["ip", "-n", netns, "link", "set", "lo", "up"])
    run(["ip", "link", "add", mgmt_if, "type", "veth", "peer", "name", MGMT_IF, "netns", netns])
    run(["ip", "addr", "add", f"{mgmt_host}/31", "dev", mgmt_if])
    run(["ip", "link", "set", mgmt_if, "up"])
    run(["ip", "-n", netns, "addr", "add", f"{metrics_host}/31", "dev", MGMT_IF])
    run(["ip", "-n", netns, "link", "set", MGMT_IF, "up"])


def spawn(cmd: list[str], log: str, env: dict[str, str] | None = None) -> int:
    """Start a long-lived process in its own session, its output appended to `log`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd="/",
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    return proc.pid


def pg_bin() -> str:
    for candidate in PG_BIN_CANDIDATES:
        if os.path.exists(f"{candidate}/initdb"):
            return candidate
    raise LabError("PostgreSQL server binaries not found: apt-get install postgresql")


def alive(pid: int) -> bool:
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


def tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run(cmd: list[str], check: bool = True) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
