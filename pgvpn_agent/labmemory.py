"""A memory cgroup of its own for a lab's PostgreSQL: the memory of a server that has run a while.

On a virtual machine that hands free memory back to its host (virtio-balloon free page
reporting, as on the project's machine), the first write into a page the guest has not used
lately faults on the host: a new page of file cache costs ~5x a reused one (`pgvpn bench
pagecache`). A database server that has run for hours has its memory full of cache, and the
log's new pages reuse pages the kernel reclaimed from it; a fresh lab on a machine with 19 GB
free writes every new page of its table and WAL into memory the host must fault in, and its
one flow halves after ~15 s (docs/scale.md). Confining the lab's cluster to a few GB gives it a
long-running server's steady state from the start: past the limit the kernel reclaims the
cluster's oldest clean cache, and new log pages land in pages it freed a moment ago.

cgroup v1's memory hierarchy takes a hard limit (`memory.limit_in_bytes`), v2 a throttle
(`memory.high`); the limit leaves room for shared_buffers and every backend, so only cache is
reclaimed.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from pgvpn_agent.labhost import LabError

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
# The cluster's own: shared_buffers (256 MB), and about 1.75 GB of file cache (the table's
# and the WAL's newest pages: what receivers and the next checkpoint read)
CACHE_MB = 2048
# per peer: its agent's two backends (8 MB PSS measured with 50 idle peers), doubled
PEER_MB = 16
# the least a limit may be: shared_buffers (256 MB) and as much again of cache
MIN_MB = 512
REMOVE_WAIT = 10.0  # seconds for a stopped cluster's last processes to leave the group


def size_mb(peers: int) -> int:
    """The default limit for a lab of `peers`."""
    return CACHE_MB + PEER_MB * peers


def check(limit_mb: int, peers: int) -> None:
    """Refuse a limit the cluster cannot start in: shared_buffers alone is 256 MB, and under
    v1's hard limit the kernel would kill a backend rather than fail an allocation."""
    least = MIN_MB + PEER_MB * peers
    if limit_mb and limit_mb < least:
        raise LabError(f"--db-memory {limit_mb}: a {peers}-peer lab's PostgreSQL needs at least "
                       f"{least} MB (shared_buffers 256 MB, its backends and some cache; "
                       f"{size_mb(peers)} MB is the benches' default), or 0 for no limit")


def _v2_root() -> Path | None:
    for root in V2_ROOTS:
        try:
            if "memory" in (root / "cgroup.controllers").read_text().split():
                return root
        except OSError:
            continue
    return None


def group(name: str) -> Path:
    """Where the group `name` lives on this machine: v1's memory hierarchy, else v2's."""
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return V1_ROOT / name
    if (root := _v2_root()) is not None:
        return root / name
    raise LabError("no memory cgroup controller on this machine (neither cgroup v1's "
                   f"{V1_ROOT} nor v2's memory controller): run the lab without a "
                   "database memory limit (--db-memory 0)")


def create(path: Path, limit_mb: int) -> None:
    """Make (or reset) the group at `path` (from group()) limited to `limit_mb`."""
    knob = "memory.limit_in_bytes" if path.parent == V1_ROOT else "memory.high"
    try:
        if knob == "memory.high" and "memory" not in (
                control := path.parent / "cgroup.subtree_control").read_text().split():
            _write(control, "+memory")
        path.mkdir(exist_ok=True)
        _write(path / knob, str(limit_mb << 20))
    except OSError as exc:
        raise LabError(f"memory cgroup {path}: {exc.strerror}: run as root, or without a "
                       "database memory limit (--db-memory 0)") from exc


def command(path: Path, cmd: list[str]) -> list[str]:
    """`cmd` run inside the group: a shell joins it, then becomes `cmd` (pg_ctl, whose
    postmaster and every backend it forks stay in the group)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(path), *cmd]


def peak_mb(path: Path) -> float | None:
    """The most the group has held (v1's max usage, v2's peak where the kernel has it)."""
    for knob in ("memory.max_usage_in_bytes", "memory.peak"):
        try:
            return int((path / knob).read_text()) / (1 << 20)
        except (OSError, ValueError):
            continue
    return None


def remove(path: Path) -> None:
    """Remove the group once the cluster's processes have left it (an immediate stop leaves
    backends exiting for a moment); its cache charges go to the parent."""
    deadline = time.monotonic() + REMOVE_WAIT
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise LabError(f"memory cgroup {path} not removed: {exc.strerror} (processes "
                               f"left: {_procs(path)})") from exc
            time.sleep(0.1)


def _procs(path: Path) -> str:
    try:
        return " ".join((path / "cgroup.procs").read_text().split()) or "none"
    except OSError:
        return "unknown"


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
