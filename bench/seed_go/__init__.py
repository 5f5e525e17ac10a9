"""The `seed-go` variant: the seed's v2 tunnel in Go (main.go), built and started by the bench.

Built offline from Debian's packages (`golang-go`, `golang-github-jackc-pgx-v4-dev`: GOPATH
mode against /usr/share/gocode, no module download), installed by the bench when missing, and
cached by the hash of the source and the Go version, so that only the first run pays the build.
It runs on a `pgvpn lab` without agents: the lab's PostgreSQL and namespaces, the seed's own
table, one process per namespace connecting as the superuser, as the seed's did.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pgvpn_agent.lab import Lab, LabError

SOURCE = Path(__file__).with_name("main.go")
APT_PACKAGES = ("golang-go", "golang-github-jackc-pgx-v4-dev")
GOPATH = "/usr/share/gocode"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgvpn-bench"

# The seed's schema (v2: no trigger), in the lab's database.
SCHEMA = "CREATE TABLE public.raw_packet (id SERIAL PRIMARY KEY, payload BYTEA, sender INET)"
# As bench.usage.LOG_POSITION: WAL so far, rows so far, size of the log.
LOG_POSITION = """
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
       (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.raw_packet_id_seq),
       pg_total_relation_size('public.raw_packet')
"""


def binary() -> Path:
    """The built program, from the cache if this source was built with this Go before."""
    _install()
    go = shutil.which("go") or "/usr/bin/go"
    version = subprocess.run([go, "version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    path = CACHE / f"seed-go-{digest}"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="", GOPROXY="off",
               GOCACHE=str(CACHE / "go-build"))
    proc = subprocess.run([go, "build", "-o", str(tmp), "."], cwd=SOURCE.parent, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise LabError(f"building {SOURCE} failed:\n{proc.stderr.strip()}")
    tmp.rename(path)
    return path


def start(lab: Lab) -> list[subprocess.Popen[bytes]]:
    """The seed's table, and the program in each of the lab's first two namespaces."""
    program = binary()
    lab.psql(SCHEMA)
    ends = lab.peers[:2]
    procs = []
    for peer, other in ((ends[0], ends[1]), (ends[1], ends[0])):
        cmd = [str(program), "-dsn", lab.dsn(), "-tun", peer.tun, "-ip", peer.ipv4,
               "-peer", other.ipv4]
        with open(lab.workdir / f"{peer.name}-seed-go.log", "wb") as log:
            procs.append(subprocess.Popen(["ip", "netns", "exec", peer.netns, *cmd], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    return procs


def _install() -> None:
    missing = [p for p in APT_PACKAGES if not _installed(p)]
    if not missing:
        return
    print(f"pgvpn bench: apt-get install {' '.join(missing)} (for seed-go)", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
           "-o", "DPkg::Lock::Timeout=300", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode == 0:
        return
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"apt-get install {' '.join(missing)} failed (seed-go needs them; "
                       f"scripts/bootstrap installs them):\n{proc.stderr.strip()[-2000:]}")


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                          text=True)
    return proc.stdout.endswith("install ok installed")
