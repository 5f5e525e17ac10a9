"""A lab's housekeeping service started again replaces the running one: none is left behind
when the lab goes down (a second start used to leave the first running, retrying forever)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgvpn_agent.labhost import alive

pytestmark = pytest.mark.integration


def housekeepers(dsn_part: str) -> list[int]:
    """Every housekeeping process whose command line names this lab's database."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "housekeeping" in cmd and dsn_part in cmd:
            found.append(int(proc.name))
    return found


def test_housekeeping_started_again_replaces_the_running_one(make_lab):
    lab = make_lab(peers=2, agents=False)
    mine = f"host={lab.sockdir} port={lab.port} "
    first = lab.housekeeping_pid
    assert housekeepers(mine) == [first], "the lab's own service"
    lab.start_housekeeping()
    lab.start_housekeeping(max_transaction=600)
    assert not alive(first)
    assert housekeepers(mine) == [lab.housekeeping_pid]
    assert lab.housekeeping_metrics(), "the new one serves its metrics"
    lab.down()
    assert housekeepers(mine) == []
