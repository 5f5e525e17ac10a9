"""A full disk under the packet log: the agent degrades predictably and recovers.

Today's partition is moved to a tablespace on a 4 MB tmpfs; traffic fills it. PostgreSQL then
refuses inserts (disk_full): the sender must stay up, drop and count what it cannot log, say so
in a gauge, not spin, and keep every row already logged intact; once the partition has room
again, traffic flows without a restart.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgvpn_agent.lab import LabError
from tests.integration.stream import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk() -> Iterator[Path]:
    mount = Path(tempfile.mkdtemp(prefix="pgvpn-full-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        subprocess.run(["chown", "postgres:postgres", str(mount)], check=True)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def today(lab: Any) -> str:
    return lab.psql("SELECT 'pgvpn.packet_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')")


def move(lab: Any, tablespace: str) -> None:
    part = today(lab)
    lab.psql(f"ALTER TABLE {part} SET TABLESPACE {tablespace}")
    for index in lab.psql("SELECT indexrelid::regclass FROM pg_index "
                          f"WHERE indrelid = '{part}'::regclass").split():
        lab.psql(f"ALTER INDEX {index} SET TABLESPACE {tablespace}")


def test_disk_full_drops_new_packets_keeps_the_log_and_recovers(make_lab, small_disk):
    lab = make_lab(peers=2)
    a, b = lab.peers
    lab.psql(f"CREATE TABLESPACE pgvpn_small LOCATION '{small_disk}'")
    try:
        move(lab, "pgvpn_small")
        with contextlib.suppress(LabError):  # the tunnel stops part-way: iperf3 may say so
            lab.iperf(a, b, seconds=4)  # far more than 4 MB

        def full() -> None:
            m = lab.agent_metrics(a)
            assert m.get("pgvpn_db_disk_full") == 1, m
            assert m['pgvpn_packets_dropped_total{reason="disk_full"}'] > 0, m
        eventually(full)
        assert os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize < 64 * 1024
        assert not lab.ping(a, b, count=2), "nothing is delivered while nothing can be logged"
        assert lab.agent_metrics(a)["pgvpn_db_up{direction=\"tx\"}"] == 1, "no reconnect storm"
        cpu_before = _cpu_seconds(a.pid)
        assert not lab.ping(a, b, count=10)
        assert _cpu_seconds(a.pid) - cpu_before < 1.0, "the sender must not spin while full"

        # Everything logged so far is intact: per link, sequence 1..tx_seq without a gap.
        check = lab.psql(
            "SELECT l.tx_seq, count(p.seq), count(DISTINCT p.seq), coalesce(max(p.seq), 0) "
            "FROM pgvpn.link l JOIN pgvpn.peer s ON s.id = l.src "
            "LEFT JOIN pgvpn.packet p ON p.src_peer = l.src AND p.dst_peer = l.dst "
            f"WHERE s.name = '{a.name}' GROUP BY l.src, l.dst, l.tx_seq")
        tx, n, distinct, top = map(int, check.split("|"))
        assert tx > 0 and n == distinct == tx == top, check
        logged = lab.psql("SELECT count(*) FROM pgvpn.packet")

        move(lab, "pg_default")  # the operator frees space
        assert lab.ping(a, b, count=3)

        def recovered() -> None:
            assert lab.agent_metrics(a).get("pgvpn_db_disk_full") == 0
        eventually(recovered)
        assert int(lab.psql("SELECT count(*) FROM pgvpn.packet")) > int(logged)
        assert "the database's disk is full" in Path(a.log).read_text()
    finally:
        if lab.psql("SELECT count(*) FROM pg_class c JOIN pg_tablespace t "
                    "ON t.oid = c.reltablespace WHERE t.spcname = 'pgvpn_small'") != "0":
            move(lab, "pg_default")
        lab.psql("DROP TABLESPACE pgvpn_small")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
