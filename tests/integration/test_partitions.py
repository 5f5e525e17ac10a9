"""A new day of the log is made without stalling the tunnel behind a long reader.

A pg_dump or a long `pgvpn log` query holds the log (and every partition) for its whole
transaction. Making a day with CREATE TABLE ... PARTITION OF would queue an ACCESS EXCLUSIVE
request on pgvpn.packet behind it, and every insert behind that; schema v12 makes the day as a
table of its own and attaches it, which no insert waits for.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

pytestmark = pytest.mark.integration


def test_a_day_is_made_beside_a_long_reader_without_blocking_inserts(make_lab):
    lab = make_lab(peers=2, agents=False)
    day = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y%m%d")
    part = f"packet_{day}"
    lab.psql(f"DROP TABLE pgvpn.{part}")
    indexes = int(lab.psql("SELECT count(*) FROM pg_indexes WHERE schemaname = 'pgvpn' AND "
                           "tablename = 'packet_default'"))
    results: list[str] = []

    def make_days() -> None:
        with psycopg.connect(lab.dsn("pgvpn_housekeeping"), autocommit=True) as conn:
            for _ in range(5):
                started = time.monotonic()
                try:
                    conn.execute("SELECT pgvpn.ensure_partitions()")
                    results.append("made")
                except psycopg.errors.LockNotAvailable:
                    results.append(f"lock timeout after {time.monotonic() - started:.2f}s")

    with psycopg.connect(lab.dsn()) as reader, psycopg.connect(lab.dsn(), autocommit=True) as w:
        reader.execute("SELECT count(*) FROM pgvpn.packet")  # holds it, as pg_dump would
        maker = threading.Thread(target=make_days)
        maker.start()
        slowest, seq = 0.0, 0
        while maker.is_alive():
            seq += 1
            started = time.monotonic()
            w.execute("INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, ip_version, "
                      "src_addr, dst_addr, protocol, length, payload) SELECT p.id, q.id, "
                      "%s, now(), 4, '10.77.0.1', "
                      "'10.77.0.2', 17, 1, '\\x45' FROM pgvpn.peer p, pgvpn.peer q "
                      "WHERE p.name = 'peer1' AND q.name = 'peer2'", (seq,))
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.01)
        maker.join()
        reader.rollback()
    print(f"\nbeside a long reader: {results}; slowest insert {slowest * 1000:.0f} ms")
    assert all(r.startswith("lock timeout after 0.") for r in results), results
    assert slowest < 0.15, f"an insert waited {slowest:.2f}s behind the new day"
    # the reader gone, the day is made, with the log's indexes
    assert lab.psql("SELECT pgvpn.ensure_partitions()", user="pgvpn_housekeeping") == "1"
    assert int(lab.psql("SELECT count(*) FROM pg_indexes WHERE schemaname = 'pgvpn' AND "
                        f"tablename = '{part}'")) == indexes
    assert lab.psql(f"SELECT relispartition FROM pg_class WHERE relname = '{part}'") == "t"
