"""How big a `pgvpn lab` may be on this machine, and what its cluster needs for that size.

The lab's cluster gets `max_connections` from its peer count by the rule the Ansible role's
preflight asserts (roles/pgvpn_postgresql/tasks/preflight.yml): every agent's sessions, one
peer at its login's CONNECTION LIMIT (a restart whose old sessions the server has not dropped
yet), and headroom. A lab larger than the machine can hold is refused before anything starts:
an agent that finds no free slot retries forever, and the lab would only time out.
"""

from __future__ import annotations

from pgvpn_agent.labhost import MGMT_PEERS, LabError

AGENT_CONNECTIONS = 2  # an agent's sessions: sender, receiver (its LISTEN)
# Each peer login's CONNECTION LIMIT, as the Ansible default pgvpn_postgresql_peer_connection_limit
PEER_CONNECTION_LIMIT = 8
# superuser_reserved_connections (3), housekeeping (2), psql, a benchmark's sampler
HEADROOM = 10
# PostgreSQL's default: small labs keep it (tests open sessions of their own)
MIN_MAX_CONNECTIONS = 100
# What one idle peer holds: its agent's RSS (57 MB) and its two backends' PSS (8 MB), measured
# with 50 idle peers (docs/scale.md), rounded up.
PEER_MEMORY_MB = 70
MEMORY_SHARE = 0.5  # of MemAvailable, for the lab; the rest stays the machine's
MIN_PEERS = 2
MAX_PEERS = 200  # addressing: 10.77.i/16 and one management /31 per peer in a /23


def max_connections(peers: int, agent_connections: int = AGENT_CONNECTIONS) -> int:
    """The cluster's `max_connections` for `peers` agents (the Ansible preflight's minimum:
    (peers - 1) x agent sessions + one peer's CONNECTION LIMIT + 10)."""
    need = (peers - 1) * agent_connections + PEER_CONNECTION_LIMIT + HEADROOM
    return max(MIN_MAX_CONNECTIONS, need)


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise LabError("no MemAvailable in /proc/meminfo")


def peer_limit(memory_mb: float) -> int:
    """The most peers a lab may have with `memory_mb` available."""
    return min(MAX_PEERS, MGMT_PEERS, int(memory_mb * MEMORY_SHARE / PEER_MEMORY_MB))


def check(peers: int, memory_mb: float | None = None) -> None:
    """Refuse a lab this machine cannot hold, saying why and what fits."""
    if peers < MIN_PEERS:
        raise LabError(f"--peers {peers}: a lab needs at least {MIN_PEERS} peers")
    memory_mb = available_mb() if memory_mb is None else memory_mb
    limit = peer_limit(memory_mb)
    if peers > limit:
        why = (f"at most {MAX_PEERS} by the lab's addressing" if limit == MAX_PEERS else
               f"each peer holds ~{PEER_MEMORY_MB} MB (its agent and its {AGENT_CONNECTIONS} "
               f"backends) and the lab takes at most {MEMORY_SHARE:.0%} of the "
               f"{memory_mb:.0f} MB available")
        raise LabError(f"--peers {peers}: this machine can hold a lab of at most {limit} peers "
                       f"({why}); PostgreSQL would need max_connections = "
                       f"{max_connections(peers)}")
