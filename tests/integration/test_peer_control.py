"""What an operator holds over a peer's login, tried through the real agents.

Revocation cuts a peer off at once and for good; the watchdog ends a peer session that holds a
transaction open (whatever the peer SET for its own timeouts); the daily quota stops one peer's
flood in the database itself, while the others keep their tunnel.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.integration.stream import Stream, eventually

pytestmark = pytest.mark.integration
PGVPN = [sys.executable, "-m", "pgvpn_agent"]
QUOTA_DROPS = 'pgvpn_packets_dropped_total{reason="quota"}'


def test_revoked_peer_is_cut_off_at_once_and_stays_out(make_lab):
    lab = make_lab(peers=3)
    p1, p2, p3 = lab.peers
    assert lab.ping(p3, p1)
    started = time.monotonic()
    out = subprocess.run([*PGVPN, "db", "revoke", "--dsn", lab.dsn(), "--peer", "peer3"],
                         capture_output=True, text=True, check=True).stdout
    assert "peer peer3 revoked" in out and "2 sessions ended" in out, out

    def gone() -> None:
        sessions = lab.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'pgvpn_peer3'")
        assert sessions == "0"
    eventually(gone, timeout=5)
    print(f"revocation: sessions gone {time.monotonic() - started:.2f}s after the command")
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        psycopg.connect(lab.dsn("pgvpn_peer3")).close()
    assert not lab.ping(p3, p1) and not lab.ping(p1, p3)
    for direction in ("tx", "rx"):  # the sender notices at its next batch
        eventually(lambda d=direction: _equal(  # type: ignore[misc]
            lab.agent_metrics(p3)[f'pgvpn_db_up{{direction="{d}"}}'], 0))
    assert lab.ping(p1, p2) and lab.ping(p2, p1), "the other peers keep their tunnel"
    assert "not permitted to log in" in Path(p3.log).read_text()

    # An administrator who gives the role its login back by mistake still gets no peer: the
    # login maps to none, so it may neither lock, send nor read.
    lab.psql("ALTER ROLE pgvpn_peer3 LOGIN")
    with psycopg.connect(lab.dsn("pgvpn_peer3"), autocommit=True) as conn:
        assert conn.execute("SELECT pgvpn.my_peer()").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM pgvpn.packet").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not a registered peer"):
            conn.execute("SELECT pgvpn.lock_peer(1::int2, 'whoever-it-is')")
    # ... and registering it again does not bring it back
    lab.psql("SELECT pgvpn.register_peers(ARRAY['peer3'])")
    assert lab.psql("SELECT revoked_at IS NOT NULL FROM pgvpn.peer WHERE name = 'peer3'") == "t"


def test_watchdog_ends_a_peer_session_that_holds_a_transaction(make_lab):
    lab = make_lab(peers=2)
    p1, p2 = lab.peers
    lab.start_housekeeping(max_transaction=2)
    # A peer's own login: LISTEN (so its backend holds the NOTIFY queue's tail while it sits in
    # a transaction), its timeouts SET away, then idle in the transaction.
    conn = psycopg.connect(lab.dsn("pgvpn_peer1"), autocommit=True)
    conn.execute("SET idle_in_transaction_session_timeout = 0")
    conn.execute("SET statement_timeout = 0")
    conn.execute("LISTEN anything")
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM pgvpn.packet")
    started = time.monotonic()
    deadline = started + 20
    while conn.info.transaction_status != psycopg.pq.TransactionStatus.UNKNOWN:
        try:
            conn.execute("SELECT 1")
        except psycopg.OperationalError:
            break
        assert time.monotonic() < deadline, "the watchdog never ended the session"
        time.sleep(0.5)
    conn.close()
    print(f"watchdog: session ended {time.monotonic() - started:.1f}s into its transaction")
    # counted once the ended backend is gone (the watchdog waits for it)
    eventually(lambda: _above(lab.housekeeping_metrics()[
        'pgvpn_watchdog_terminated_sessions_total{reason="long_transaction"}'], 0))
    assert "watchdog: ended session" in lab.housekeeping_log.read_text()
    assert lab.ping(p1, p2) and lab.ping(p2, p1)
    for peer in lab.peers:
        m = lab.agent_metrics(peer)
        assert m['pgvpn_db_reconnects_total{direction="tx"}'] == 0, "an agent was ended"
        assert m['pgvpn_db_reconnects_total{direction="rx"}'] == 0, "an agent was ended"


@pytest.mark.parametrize("wake", ["auto", "after_commit"])
def test_quota_stops_a_flood_in_the_database_and_spares_the_others(make_lab, wake):
    """after_commit: every batch is a CALL of send_and_wake() (schema v16), refused before its
    commit; the sender must see it refused, not logged."""
    lab = make_lab(peers=3, transport={"wake": wake})
    p1, p2, p3 = lab.peers
    used = int(lab.psql("SELECT bytes FROM pgvpn.usage u JOIN pgvpn.peer p ON p.id = u.peer "
                        "WHERE p.name = 'peer1'"))
    quota = used + 20_000  # a datagram is charged ~130 bytes: ~150 get in
    lab.psql(f"UPDATE pgvpn.peer SET bytes_per_day = {quota} WHERE name = 'peer1'")
    flood = Stream(lab, p1, p2, port=7501)
    spared = Stream(lab, p3, p2, port=7502)
    try:
        for n in range(1, 601):
            flood.send(n)
            spared.send(n)
            if n % 50 == 0:
                time.sleep(0.05)
        eventually(lambda: _above(lab.agent_metrics(p1)[QUOTA_DROPS], 0))
        spared.wait_count(600, timeout=20)
    finally:
        flooded, others = flood.close(), spared.close()
    assert others == list(range(1, 601)), "another peer lost packets to peer1's flood"
    assert 0 < len(flooded) < 600
    assert flooded == sorted(flooded), "what got through arrived in order"
    logged = int(lab.psql("SELECT bytes FROM pgvpn.usage u JOIN pgvpn.peer p ON p.id = u.peer "
                          "WHERE p.name = 'peer1'"))
    assert logged <= quota, "the quota held in the database"
    assert "over its daily log quota" in Path(p1.log).read_text()
    # the operator lifts it: the peer resumes by itself
    lab.psql("UPDATE pgvpn.peer SET bytes_per_day = NULL WHERE name = 'peer1'")
    eventually(lambda: _true(lab.ping(p1, p2)), timeout=15)


def _equal(value: object, expected: object) -> None:
    assert value == expected, value


def _above(value: float, floor: float) -> None:
    assert value > floor, value


def _true(value: bool) -> None:
    assert value


def test_a_peer_cannot_hold_up_partition_creation(make_lab):
    """A peer's transaction holding its read lock on the log while housekeeping must create a
    day: the job waits 500 ms, ends that session (older than a batch could be) and retries."""
    lab = make_lab(peers=2)
    p1, p2 = lab.peers
    lab.stop_housekeeping()
    day = lab.psql("SELECT 'packet_' || to_char((now() AT TIME ZONE 'UTC')::date + 2, "
                   "'YYYYMMDD')")
    lab.psql(f"DROP TABLE pgvpn.{day}")
    conn = psycopg.connect(lab.dsn("pgvpn_peer1"), autocommit=True)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM pgvpn.packet")
    time.sleep(6)
    started = time.monotonic()
    lab.start_housekeeping(max_transaction=600)

    def made() -> None:
        assert lab.psql(f"SELECT to_regclass('pgvpn.{day}') IS NOT NULL") == "t"
    eventually(made, timeout=20)
    print(f"partition made {time.monotonic() - started:.1f}s after housekeeping started")
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    m = lab.housekeeping_metrics()
    assert m['pgvpn_watchdog_terminated_sessions_total{reason="blocking_housekeeping"}'] == 1, m
    assert lab.ping(p1, p2) and lab.ping(p2, p1)


def test_watchdog_frees_a_pinned_notify_queue(make_lab):
    """A peer LISTENs in a transaction it never ends while another of its sessions floods the
    cluster's NOTIFY queue (the NOTIFY command needs no privilege): past 5 % full, the pinning
    session goes within seconds, long before the queue (8 GB) is full."""
    lab = make_lab(peers=2)
    p1, p2 = lab.peers
    lab.start_housekeeping(max_transaction=600)
    pin = psycopg.connect(lab.dsn("pgvpn_peer1"), autocommit=True)
    pin.execute("LISTEN flood")
    pin.execute("BEGIN")
    pin.execute("SELECT 1")
    flood = psycopg.connect(lab.dsn("pgvpn_peer1"), autocommit=True)
    usage = "SELECT pg_notification_queue_usage()"
    started = time.monotonic()
    peak = 0.0
    try:
        while time.monotonic() - started < 120:
            flood.execute("DO $$ BEGIN FOR i IN 1..2000 LOOP EXECUTE format('NOTIFY flood, %L', "
                          "i || repeat('x', 7900)); END LOOP; END $$")
            level = float(flood.execute(usage).fetchone()[0])  # type: ignore[index]
            peak = max(peak, level)
            if pin.closed or pin.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN:
                break
            try:
                pin.execute("SELECT 1")
            except psycopg.OperationalError:
                break
        else:
            raise AssertionError(f"the pinning session was never ended (queue at {peak:.0%})")
    finally:
        pin.close()
    print(f"notify queue: pin ended after {time.monotonic() - started:.1f}s at {peak:.1%}")
    assert peak < 0.5
    eventually(lambda: _equal(float(flood.execute(usage).fetchone()[0]), 0.0))  # type: ignore[index]
    flood.close()
    eventually(lambda: _above(lab.housekeeping_metrics()[
        'pgvpn_watchdog_terminated_sessions_total{reason="notify_queue"}'], 0))
    assert lab.ping(p1, p2) and lab.ping(p2, p1)


def test_a_peer_cannot_spill_past_its_temp_file_limit(make_lab):
    """Sorts and hashes spill to temporary files that no quota counts; temp_file_limit, which
    only a superuser may change, bounds them for a peer's login (its own SET is refused)."""
    lab = make_lab(peers=2, agents=False)
    with psycopg.connect(lab.dsn("pgvpn_peer1"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET temp_file_limit = -1")
        conn.execute("SET work_mem = '64kB'")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded,
                           match="temporary file size exceeds temp_file_limit"):
            conn.execute("SELECT count(*) FROM (SELECT g, md5(g::text) FROM "
                         "generate_series(1, 3000000) g ORDER BY 2) s")
