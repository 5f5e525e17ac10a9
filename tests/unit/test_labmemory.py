"""labmemory: the command that joins a group before it becomes pg_ctl, sizes, removal, and
what the mesh reports say of the limit."""

from __future__ import annotations

import subprocess

import pytest

from bench import meshreport
from pgvpn_agent import labmemory
from pgvpn_agent.lab import Lab
from pgvpn_agent.labhost import LabError


def test_a_command_joins_the_group_before_it_runs(tmp_path):
    out = subprocess.run(labmemory.command(tmp_path, ["sh", "-c", 'echo "ran as $$"']),
                         capture_output=True, text=True, check=True).stdout
    joined = (tmp_path / "cgroup.procs").read_text().split()
    assert out.strip() == f"ran as {joined[0]}", "the command is not the process that joined"


def test_a_group_with_spaces_in_its_path_is_one_argument(tmp_path):
    group = tmp_path / "a lab's db"
    group.mkdir()
    subprocess.run(labmemory.command(group, ["true"]), check=True)
    assert (group / "cgroup.procs").read_text().strip().isdigit()


def test_sizes_leave_room_for_every_peer_beside_the_cache():
    assert labmemory.size_mb(2) == labmemory.CACHE_MB + 2 * labmemory.PEER_MB
    assert labmemory.size_mb(50) - labmemory.size_mb(10) == 40 * labmemory.PEER_MB


@pytest.mark.parametrize("limit", [-1, 1, 511])
def test_a_limit_the_cluster_cannot_start_in_is_refused_before_anything_starts(limit, tmp_path):
    with pytest.raises(LabError, match=f"--db-memory {limit}: a 2-peer lab's PostgreSQL needs "
                                       "at least 544 MB"):
        Lab.create(tmp_path / "lab", db_memory_mb=limit)
    assert not (tmp_path / "lab").exists()
    Lab.create(tmp_path / "lab", db_memory_mb=0)  # no limit
    Lab.create(tmp_path / "lab", db_memory_mb=544)


def test_removing_a_group_that_is_gone_is_quiet_and_a_stuck_one_says_why(tmp_path):
    labmemory.remove(tmp_path / "gone")
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    (stuck / "cgroup.procs").write_text("4242\n")
    with pytest.raises(LabError, match="4242"):
        labmemory.remove(stuck)


def test_reports_name_the_limit_or_its_absence():
    assert meshreport.db_memory({"2": 2080, "10": 2208}) == (
        "PostgreSQL in a memory cgroup of 2080 MB (2-peer labs) / 2208 MB (10-peer labs)")
    assert meshreport.db_memory({"2": 0, "10": 0}) == "PostgreSQL unconfined"
    assert meshreport.db_memory(0) == "PostgreSQL unconfined"
    assert meshreport.db_memory(None) == "PostgreSQL's memory not recorded"
    on = "on, blocks of order 9 and up"
    assert "reclaims" in meshreport._memory_note(on, {"2": 2080})
    assert "faults on the host" in meshreport._memory_note(on, {"2": 0})
