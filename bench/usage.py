"""What a transfer costs: CPU time of the tunnel's processes and of PostgreSQL, peak memory,
and the log PostgreSQL writes for it.

CPU comes from /proc rather than from the agents' own metrics so that OpenVPN and the agents are
measured the same way, and so that PostgreSQL backends that exit during a run still count (the
postmaster's cutime/cstime hold the CPU time of every child it has reaped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pgvpn_agent.lab import Lab

TICK = os.sysconf("SC_CLK_TCK")

# Per packet-log position: WAL written so far, rows logged so far, on-disk size of the log.
LOG_POSITION = """
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
       (SELECT coalesce(sum(tx_seq), 0) FROM pgvpn.link),
       (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits
        WHERE inhparent = 'pgvpn.packet'::regclass)
"""


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces): [0] is the
    state, [1] the parent pid, [11:15] utime, stime, cutime, cstime."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float:
    """User + system seconds of a process, all its threads together."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICK


def cluster_cpu(postmaster: int) -> float:
    """User + system seconds of a PostgreSQL cluster: the postmaster, its live children and
    every child it has already reaped."""
    fields = _stat(postmaster)
    total = sum(int(f) for f in fields[11:15])
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            child = _stat(int(entry.name))
        except (OSError, IndexError):
            continue  # exited while we looked: its time is in the postmaster's cutime now
        if int(child[1]) == postmaster:
            total += int(child[11]) + int(child[12])
    return total / TICK


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of a process's resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise ValueError(f"no VmHWM in /proc/{pid}/status")


@dataclass(frozen=True)
class LogPosition:
    wal_bytes: int
    rows: int
    table_bytes: int

    @classmethod
    def of(cls, lab: Lab) -> LogPosition:
        wal, rows, size = lab.psql(LOG_POSITION).split("|")
        return cls(int(wal), int(rows), int(size))


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds so far: of the tunnel's own processes (agents or OpenVPN) and of the
    database cluster (absent for the baselines)."""

    tunnel: float
    postgres: float | None

    @classmethod
    def of(cls, tunnel_pids: list[int], postmaster: int | None) -> CpuTimes:
        return cls(sum(process_cpu(p) for p in tunnel_pids),
                   None if postmaster is None else cluster_cpu(postmaster))
