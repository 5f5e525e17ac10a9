"""Retention drops old day partitions while traffic flows, without losing a live packet."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.stream import Stream, eventually

pytestmark = pytest.mark.integration
PGVPN = [sys.executable, "-m", "pgvpn_agent"]


def old_partition(lab, day: str, rows: int) -> None:
    """A partition of a past day with rows in it, as housekeeping running back then would
    leave: made by the schema's owner, filled by the agents."""
    name = "packet_" + day.replace("-", "")
    lab.psql(f"SET ROLE pgvpn_owner; CREATE TABLE pgvpn.{name} PARTITION OF pgvpn.packet FOR "
             f"VALUES FROM ('{day} 00:00+00') TO (('{day}'::date + 1)::timestamp AT TIME ZONE "
             "'UTC')")
    lab.psql(f"INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, logged_at, ip_version, "
             f"src_addr, dst_addr, protocol, length, payload) SELECT 1, 2, -g, "
             f"'{day} 12:00+00', '{day} 12:00+00', 4, '10.77.0.1', '10.77.0.2', 17, 1000, "
             f"decode(repeat('ab', 1000), 'hex') FROM generate_series(1, {rows}) g")


def test_retention_while_traffic_flows(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    for day in ("2020-01-01", "2020-01-02", "2020-01-03"):
        old_partition(lab, day, rows=2000)
    stream = Stream(lab, a, b, port=7400)
    done = threading.Event()
    sent: list[int] = []

    def pump() -> None:
        n = 0
        while not done.is_set():
            n += 1
            assert stream.send(n)
            sent.append(n)
            time.sleep(0.003)

    pumper = threading.Thread(target=pump)
    pumper.start()
    try:
        time.sleep(1.0)
        # by size first: a budget one byte short of the total drops the oldest day only ...
        total, oldest = map(int, lab.psql(
            "SELECT sum(bytes), (array_agg(bytes ORDER BY day))[1] FROM pgvpn.partitions()"
        ).split("|"))
        # a peer's login may not: retention is the operator's
        refused = subprocess.run([*PGVPN, "db", "retention", "--dsn", lab.dsn(f"pgvpn_{a.name}"),
                                  "--max-size", "1"], capture_output=True, text=True)
        assert refused.returncode == 2 and "permission denied" in refused.stderr
        out = subprocess.run([*PGVPN, "db", "retention", "--dsn", lab.dsn("pgvpn_housekeeping"),
                              "--max-size", str(total - 1)], check=True, capture_output=True,
                             text=True)
        assert oldest > 1_000_000
        assert "packet_20200101" in out.stdout and "size" in out.stdout
        # ... then by age: everything older than a week goes
        out = subprocess.run([*PGVPN, "db", "retention", "--dsn", lab.dsn("pgvpn_housekeeping"),
                              "--keep-days", "7"], check=True, capture_output=True, text=True)
        assert "packet_20200102" in out.stdout and "packet_20200103" in out.stdout
        time.sleep(1.0)
    finally:
        done.set()
        pumper.join()
    stream.wait_count(len(sent), timeout=20)
    received = stream.close()
    assert sorted(received) == sent, "a live packet was lost or duplicated"
    left = lab.psql("SELECT string_agg(partition, ',') FROM pgvpn.partitions() "
                    "WHERE day < current_date")
    assert left == ""


def test_housekeeping_runs_retention_and_reports_each_drop(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    for day in ("2020-01-01", "2020-01-02"):
        old_partition(lab, day, rows=500)
    lab.start_housekeeping(keep_days=7, every=10)

    def dropped() -> None:
        m = lab.housekeeping_metrics()
        assert m.get('pgvpn_retention_partitions_dropped_total{reason="age"}') == 2, m
        assert m['pgvpn_retention_freed_bytes_total{reason="age"}'] > 2 * 500 * 1000
        assert m['pgvpn_housekeeping_last_success_timestamp_seconds{job="retention"}'] > 0
    eventually(dropped, timeout=30)
    log = Path(lab.housekeeping_log).read_text()
    assert "retention: dropped packet_20200101" in log and "by age" in log
    assert lab.ping(a, b, count=2)
    assert lab.psql("SELECT count(*) FROM pgvpn.partitions() WHERE day < current_date") == "0"
