"""What each variant runs on: a `pgvpn lab`, the seed's Go program on a lab without agents,
OpenVPN between two namespaces, or a bare veth pair.

Every testbed is a `Lab` whose first two peers are the tunnel's ends, so that pings and iperf3
go through the same code whatever carries them; the baselines use the lab's namespaces and its
`down()` for cleanup, and simply never start a database or agents.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import seed_go
from bench.usage import LOG_POSITION
from pgvpn_agent.lab import Lab, LabError

# The baselines' underlay between the two namespaces; tunnel addresses stay the lab's 10.77/16.
UNDERLAY = ("10.78.0.1", "10.78.0.2")
UNDERLAY_IF = "veth0"
OPENVPN_PORT = 1194


def scratch_dir(name: str) -> Path:
    """A new directory under /tmp for one run's labs: open to the lab's postgres user, whose
    cluster lives in it (mkdtemp alone makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=f"pgvpn-{name}-", dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    kind: str = "pgvpn"  # pgvpn | seed-go | openvpn | veth
    mode: str = "logged"
    batch_max: int | None = None
    mtu: int = 1500
    offload: bool = True
    cipher: str = ""
    encrypt: bool = False  # pgvpn: payloads sealed with the pair's key (encryption at rest)


@dataclass
class Testbed:
    lab: Lab
    tunnel_pids: list[int]  # the processes that carry the packets: agents, seed-go or OpenVPN
    postmaster: int | None = None
    log_position: str = LOG_POSITION  # the query of bench.usage.LogPosition for this log


@contextmanager
def testbed(variant: Variant, workdir: Path, prefix: str, port: int) -> Iterator[Testbed]:
    """Bring a variant up in fresh namespaces, and everything down afterwards, pass or fail."""
    lab = Lab.create(workdir, prefix=prefix, port=port, mode=variant.mode,
                     batch_max=variant.batch_max, mtu=variant.mtu, offload=variant.offload,
                     encrypt=variant.encrypt)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if variant.kind == "pgvpn":
            lab.up()
            yield Testbed(lab, [p.pid for p in lab.peers], lab.postmaster_pid())
            return
        if variant.kind == "seed-go":
            lab.up(agents=False)
            procs = seed_go.start(lab)
            _wait_ping(lab, procs, "seed-go")
            yield Testbed(lab, [p.pid for p in procs], lab.postmaster_pid(),
                          seed_go.LOG_POSITION)
            return
        lab.add_namespaces()
        if variant.kind == "veth":
            _veth_pair(lab, [f"{p.ipv4}/24" for p in lab.peers[:2]])
        else:
            _veth_pair(lab, [f"{a}/30" for a in UNDERLAY])
            procs = _start_openvpn(lab, variant.cipher)
        _wait_ping(lab, procs, "openvpn")
        yield Testbed(lab, [p.pid for p in procs])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        lab.down()


def _veth_pair(lab: Lab, addresses: list[str]) -> None:
    a, b = lab.peers[:2]
    _ip("link", "add", UNDERLAY_IF, "netns", a.netns, "type", "veth", "peer", "name",
        UNDERLAY_IF, "netns", b.netns)
    for peer, address in zip((a, b), addresses, strict=True):
        _ip("-n", peer.netns, "addr", "add", address, "dev", UNDERLAY_IF)
        _ip("-n", peer.netns, "link", "set", UNDERLAY_IF, "up")


def _start_openvpn(lab: Lab, cipher: str) -> list[subprocess.Popen[bytes]]:
    """OpenVPN 2.6 point-to-point in TLS mode (static keys cannot carry AES-GCM): a
    self-signed certificate per end, each pinning the other's with --peer-fingerprint."""
    for tool in ("openvpn", "openssl"):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` is not installed (apt-get install openvpn openssl)")
    ends = lab.peers[:2]
    fingerprints = [_certificate(lab.workdir, p.name) for p in ends]
    procs = []
    for i, (peer, other) in enumerate(((ends[0], ends[1]), (ends[1], ends[0]))):
        cmd = ["openvpn", "--dev", peer.tun, "--dev-type", "tun", "--proto", "udp",
               "--port", str(OPENVPN_PORT), "--local", UNDERLAY[i], "--remote", UNDERLAY[1 - i],
               "--ifconfig", peer.ipv4, other.ipv4, "--disable-dco",
               "--cert", str(lab.workdir / f"{peer.name}.crt"),
               "--key", str(lab.workdir / f"{peer.name}.key"),
               "--peer-fingerprint", fingerprints[1 - i],
               "--data-ciphers", cipher, "--verb", "3"]
        if i == 0:
            cmd += ["--tls-client"]
        else:
            cmd += ["--tls-server", "--dh", "none"]
        if cipher == "none":
            cmd += ["--cipher", "none", "--auth", "none"]
        with open(lab.workdir / f"{peer.name}-openvpn.log", "wb") as log:
            procs.append(subprocess.Popen(["ip", "netns", "exec", peer.netns, *cmd], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    return procs


def _certificate(workdir: Path, name: str) -> str:
    """A throwaway self-signed EC certificate; returns its SHA-256 fingerprint."""
    crt, key = workdir / f"{name}.crt", workdir / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN=pgvpn-bench-{name}", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True)
    out = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-fingerprint",
                          "-sha256"], check=True, capture_output=True, text=True).stdout
    return out.strip().split("=", 1)[1]


def _wait_ping(lab: Lab, procs: list[subprocess.Popen[bytes]], what: str,
               timeout: float = 30) -> None:
    a, b = lab.peers[:2]
    deadline = time.monotonic() + timeout
    while not lab.ping(a, b):
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            log = lab.workdir / f"{a.name}-{what}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise LabError(f"{a.name} cannot ping {b.name} over the baseline\n{tail}")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
