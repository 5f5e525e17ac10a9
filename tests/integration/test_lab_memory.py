"""A lab's PostgreSQL in a memory cgroup of its own (labmemory): the postmaster, every backend
and a restarted server stay in it, the cache it writes stays under the limit, and `down` removes
the group."""

from __future__ import annotations

import pytest

from pgvpn_agent import labmemory

pytestmark = pytest.mark.integration

LIMIT_MB = 544  # the least a 2-peer lab may have (labmemory.check)


def _members(lab) -> set[int]:
    return {int(p) for p in (lab.db_cgroup / "cgroup.procs").read_text().split()}


def _server_pids(lab) -> set[int]:
    # not the query's own backend: it has exited by the time the group is read
    rows = lab.psql("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
    return {int(p) for p in rows.split()} | {lab.postmaster_pid()}


def test_the_cluster_and_its_backends_live_in_the_group_and_its_cache_stays_under_the_limit(
        make_lab):
    lab = make_lab(db_memory_mb=LIMIT_MB)
    group = lab.db_cgroup
    knob = "memory.limit_in_bytes" if group.parent == labmemory.V1_ROOT else "memory.high"
    assert int((group / knob).read_text()) == LIMIT_MB << 20
    agents = lab.psql("SELECT count(*) FROM pg_stat_activity WHERE usename LIKE 'pgvpn_peer%'")
    assert int(agents) >= 2 * len(lab.peers), "the agents' sessions are not up"
    outside = _server_pids(lab) - _members(lab)
    assert not outside, f"server processes outside the lab's group: {outside}"

    # 800 MB of WAL through a 544 MB group (shared_buffers 256 MB of it): the kernel reclaims
    # the group's cache instead of letting it grow
    lab.psql("SELECT count(pg_logical_emit_message(false, 'fill', repeat('x', 1000000))) "
             "FROM generate_series(1, 800)")
    peak = labmemory.peak_mb(group)
    assert peak is not None and LIMIT_MB * 0.8 <= peak <= LIMIT_MB * 1.05, (
        f"the group held at most {peak} MB: not filled to its limit, or past it")
    a, b = lab.peers
    assert lab.ping(a, b) and lab.ping(b, a), "the tunnel stopped under the limit"

    lab.restart_postgres()
    outside = _server_pids(lab) - _members(lab)
    assert not outside, f"restarted server processes outside the group: {outside}"

    lab.down()
    assert not group.exists(), "down left the memory cgroup behind"
