"""The database's own limits: closed days frozen once, the limits exported, passwords rotated.

Freezing: a closed day left as its own day's autovacuums leave it (pages all-visible, rows not
frozen) is marked by housekeeping's function, frozen by autovacuum — not by housekeeping, which
may not VACUUM — once, and then skipped by every later aggressive vacuum. Transaction ids are
burnt in bulk to bring autovacuum's threshold (100k) near; autovacuum naps 1 s here.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgvpn_agent.config import Database, Retention
from pgvpn_agent.housekeeping import Housekeeping
from pgvpn_agent.lab import HOUSEKEEPING_ROLE
from tests.integration.stream import eventually
from tests.integration.test_retention import old_partition

pytestmark = pytest.mark.integration

FAST_AUTOVACUUM = {"autovacuum_naptime": "1s"}
FREEZE = "SELECT partition, state FROM pgvpn.freeze_closed_days() ORDER BY day"


def closed_day(lab, day: str, rows: int) -> str:
    """A past day as its own day left it: filled by the senders, vacuumed by autovacuum (all
    pages all-visible, no row frozen: vacuum_freeze_min_age is 50M)."""
    name = "packet_" + day.replace("-", "")
    old_partition(lab, day, rows)
    lab.psql(f"VACUUM pgvpn.{name}")
    return name


def burn_xids(lab, n: int) -> None:
    """n transactions, each assigned an id (one COMMIT each, without waiting for the flush)."""
    subprocess.run(["psql", "-X", "-q", "-d", lab.dsn(), "-c", "SET synchronous_commit = off",
                    "-c", f"DO $$ BEGIN FOR i IN 1..{n} LOOP PERFORM pg_current_xact_id(); "
                    "COMMIT; END LOOP; END $$"], check=True, capture_output=True)


def pages(lab, name: str) -> tuple[int, int, int]:
    """(pages, all-visible, all-frozen) of the partition's heap."""
    total, visible, frozen = lab.psql(
        f"SELECT pg_relation_size('pgvpn.{name}') / 8192, v.all_visible, v.all_frozen "
        f"FROM pg_visibility_map_summary('pgvpn.{name}') v").split("|")
    return int(total), int(visible), int(frozen)


def xid_age(lab, name: str) -> int:
    return int(lab.psql(f"SELECT greatest(age(c.relfrozenxid), age(t.relfrozenxid)) FROM "
                        f"pg_class c JOIN pg_class t ON t.oid = c.reltoastrelid "
                        f"WHERE c.oid = 'pgvpn.{name}'::regclass"))


def all_frozen(lab, name: str, younger_than: int) -> None:
    """relfrozenxid (heap and TOAST) advanced and every page all-frozen."""
    assert xid_age(lab, name) < younger_than
    total, _, frozen = pages(lab, name)
    assert frozen == total


def wal_position(lab) -> int:
    return int(lab.psql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"))


def test_closed_days_are_frozen_once_one_at_a_time(make_lab):
    lab = make_lab(peers=2, agents=False, pg_settings=FAST_AUTOVACUUM)
    lab.stop_housekeeping()  # this test calls the functions the service would
    lab.psql("CREATE EXTENSION pg_visibility")
    older, newer = closed_day(lab, "2020-01-01", 3000), closed_day(lab, "2020-01-02", 3000)
    total, visible, frozen = pages(lab, newer)
    assert visible == total > 300 and frozen == 0

    def freeze() -> list[str]:
        return lab.psql(FREEZE, user=HOUSEKEEPING_ROLE).splitlines()

    # not before the day's indexes are made: the freezing vacuum would hold up their creation
    assert freeze() == [f"{older}|waiting", f"{newer}|waiting"]
    lab.psql("SELECT pgvpn.index_closed_days()", user=HOUSEKEEPING_ROLE)
    # the newest day first, and only one at a time
    assert freeze() == [f"{older}|waiting", f"{newer}|marked"]
    assert freeze() == [f"{older}|waiting", f"{newer}|freezing"]
    marked_age = xid_age(lab, newer)
    lab.psql("CHECKPOINT")  # every page's first change after it is logged whole
    wal = wal_position(lab)
    burn_xids(lab, 110_000)

    eventually(lambda: all_frozen(lab, newer, younger_than=110_000 + marked_age), timeout=90)
    freezing_wal = wal_position(lab) - wal
    # the mark is lifted, the next day's is set, in one call
    assert freeze() == [f"{older}|marked", f"{newer}|frozen"]
    options = lab.psql(f"SELECT reloptions FROM pg_class WHERE oid = 'pgvpn.{newer}'::regclass")
    assert options == "{autovacuum_freeze_min_age=0}"

    # never written again: an aggressive vacuum of the frozen day skips every page, heap and
    # TOAST (its own report; the WAL is the cluster's, where the next day's freezing runs now)
    heap = total * 8192
    assert freezing_wal > heap / 2, "freezing logs each page once (a full-page image)"
    report = subprocess.run(["psql", "-X", "-d", lab.dsn(), "-c",
                             f"VACUUM (FREEZE, VERBOSE) pgvpn.{newer}"], check=True,
                            capture_output=True, text=True).stderr
    scanned = [int(n) for n in re.findall(r"pages: \d+ removed, \d+ remain, (\d+) scanned",
                                          report)]
    dirtied = [int(n) for n in re.findall(r"buffer usage: .* (\d+) dirtied", report)]
    # (vacuum reads the last page, to see whether the file could be truncated)
    assert len(scanned) == 2 and max(scanned) <= 1 and dirtied == [0, 0], (
        f"a frozen day was read or written again: {report}")

    marked_age = xid_age(lab, older)
    burn_xids(lab, 110_000)
    eventually(lambda: all_frozen(lab, older, younger_than=110_000 + marked_age), timeout=90)
    assert freeze() == [f"{older}|frozen", f"{newer}|done"]
    assert freeze() == [f"{older}|done", f"{newer}|done"]


def test_limits_reach_the_housekeeping_metrics(make_lab):
    lab = make_lab(peers=2, agents=False)
    # a pg_dump's snapshot: nothing ends it (not a peer), vacuum is held back
    with psycopg.connect(lab.dsn(), application_name="a pg_dump") as dump:
        dump.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        dump.execute("SELECT count(*) FROM pgvpn.link").fetchone()
        burn_xids(lab, 1000)
        lab.psql("UPDATE pgvpn.usage SET rows = rows + 1")

        def exported() -> None:
            m = lab.housekeeping_metrics()
            assert m["pgvpn_database_xmin_horizon_age"] >= 1000
            assert m["pgvpn_database_oldest_transaction_seconds"] > 0
            assert m['pgvpn_hot_table_dead_rows{table="usage"}'] >= 2
            assert m["pgvpn_database_transaction_ids"] >= m["pgvpn_database_xid_age"] >= 1000
            assert m["pgvpn_database_autovacuum_freeze_max_age"] == 200_000_000

        eventually(exported, timeout=25)
    m = lab.housekeeping_metrics()
    # the lab's bound: max_wal_size 4GB + max_slot_wal_keep_size 1GB
    assert m["pgvpn_wal_size_limit_bytes"] == 5 * 2**30
    assert 0 < m["pgvpn_wal_filesystem_avail_bytes"] <= m["pgvpn_wal_filesystem_size_bytes"]
    assert m["pgvpn_wal_archive_pending_segments"] == 0
    assert m["pgvpn_log_unfrozen_partitions"] == 0
    for table in ("link", "cursor", "usage"):
        assert m[f'pgvpn_hot_table_size_bytes{{table="{table}"}}'] > 0
    for job in ("freeze", "limits"):
        assert m[f'pgvpn_housekeeping_runs_total{{job="{job}",result="ok"}}'] >= 1


def test_a_rotated_password_reaches_new_pool_connections(make_lab, tmp_path: Path):
    lab = make_lab(peers=2, agents=False)
    role = "pgvpn_rotating"
    lab.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'first-password' IN ROLE pgvpn_operator")
    hba = lab.datadir / "pg_hba.conf"
    hba.write_text(f"local pgvpn {role} scram-sha-256\n" + hba.read_text())
    lab.psql("SELECT pg_reload_conf()")
    secret = tmp_path / "password"
    secret.write_text("first-password\n")
    service = Housekeeping(Database(dsn=lab.dsn(role), password_file=secret), Retention(),
                           threading.Event())
    service.pool.open(wait=True)
    try:
        with service.pool.connection() as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        lab.psql(f"ALTER ROLE {role} PASSWORD 'second-password'")
        secret.write_text("second-password\n")
        time.sleep(0.1)
        # the idle connection is reused, a second one is new: it must log in with the new one
        with service.pool.connection() as first, service.pool.connection() as second:
            for conn in (first, second):
                assert conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        service.pool.close()
        service.workers.shutdown()
