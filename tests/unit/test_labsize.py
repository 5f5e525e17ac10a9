"""The lab's cluster sizing: the Ansible preflight's rule, and a refusal that says why."""

from __future__ import annotations

import pytest

from pgvpn_agent import labsize
from pgvpn_agent.labhost import LabError


def ansible_preflight_minimum(peers: int, peer_connection_limit: int = 8) -> int:
    """roles/pgvpn_postgresql/tasks/preflight.yml, transcribed."""
    return (peers - 1) * 2 + peer_connection_limit + 10


@pytest.mark.parametrize("peers", [2, 10, 44, 45, 50, 100, 200])
def test_max_connections_is_the_preflight_minimum_never_below_the_default(peers):
    assert labsize.max_connections(peers) == max(100, ansible_preflight_minimum(peers))


def test_fifty_peers_fit_with_one_peer_at_its_limit_and_the_superuser_slots_free():
    slots = labsize.max_connections(50) - 3  # superuser_reserved_connections
    agents = 49 * labsize.AGENT_CONNECTIONS + labsize.PEER_CONNECTION_LIMIT
    assert slots - agents >= 2 + 1  # housekeeping's two sessions, a benchmark's sampler


def test_more_sessions_per_agent_scale_the_cluster():
    assert labsize.max_connections(50, agent_connections=4) == 49 * 4 + 8 + 10


def test_fifty_peers_fit_a_machine_with_a_few_gigabytes():
    assert labsize.peer_limit(memory_mb=8000) >= 50
    labsize.check(50, memory_mb=8000)


def test_addressing_caps_the_lab():
    assert labsize.peer_limit(memory_mb=10**7) == labsize.MAX_PEERS
    with pytest.raises(LabError, match=r"at most 200 peers .*addressing"):
        labsize.check(201, memory_mb=10**7)


def test_a_lab_too_big_for_memory_is_refused_with_what_fits():
    with pytest.raises(LabError) as refused:
        labsize.check(50, memory_mb=2000)
    message = str(refused.value)
    assert "at most 14 peers" in message and "2000 MB available" in message
    assert "max_connections = 116" in message


def test_one_peer_is_not_a_lab():
    with pytest.raises(LabError, match="at least 2"):
        labsize.check(1, memory_mb=8000)
