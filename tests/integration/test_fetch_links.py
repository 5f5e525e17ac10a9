"""A receiver woken by notifications reads only the links they name, and every link at least once
a poll interval: a batch whose wake-up was lost is delivered while other links keep it busy."""

from __future__ import annotations

import time

import psycopg
import pytest

from pgvpn_agent import wire
from pgvpn_agent.lab import Lab
from pgvpn_agent.labhost import role
from tests.integration.hostile import send
from tests.integration.pump import Pump

pytestmark = pytest.mark.integration

PORT = 7793
# A busy backend flushes its index statistics at most once a second, so the scans counted over
# WINDOW seconds are those of WINDOW +- 1 s while the fetches are exact: reading only the named
# link gives about 1.0 link per fetch (+-1/WINDOW), reading both about 2.0 (+-2/WINDOW).
WINDOW = 8
# index scans of the log's day partitions, and how many partitions there are
SCANS = """SELECT sum(s.idx_scan), count(DISTINCT i.inhrelid) FROM pg_catalog.pg_inherits i
           JOIN pg_catalog.pg_stat_user_indexes s ON s.relid = i.inhrelid
           WHERE i.inhparent = 'pgvpn.packet'::regclass"""


def scans(lab: Lab) -> tuple[int, int]:
    total, partitions = lab.psql(SCANS).split("|")
    return int(total), int(partitions)


@pytest.mark.parametrize("sealed", [False, True], ids=["fetched", "carried"])
def test_a_batch_without_wake_up_arrives_within_a_poll_interval_while_others_flow(
        make_lab, sealed):
    """Sealed, the busy link's rows ride in its notifications and need no fetch at all: the
    look at every link must happen all the same."""
    lab = make_lab(peers=3, encrypt=sealed)
    a, b, c = lab.peers
    ids = dict(r.split("|") for r in lab.psql("SELECT name, id FROM pgvpn.peer").splitlines())
    src, dst = int(ids[b.name]), int(ids[c.name])
    lab.stop_agent(b)  # its link to c is written by hand below, unnotified
    wakeups = 'pgvpn_receiver_wakeups_total{cause="notify"}'
    fetches = "pgvpn_fetch_duration_seconds_count"

    pump = Pump(lab, a, c, port=PORT)  # keeps c woken every 20 ms
    try:
        time.sleep(1.5)
        # c has two incoming links; each fetch probes each link it names in every partition
        scanned, partitions = scans(lab)
        fetched = lab.agent_metrics(c)[fetches]
        time.sleep(WINDOW)
        links_per_fetch = ((scans(lab)[0] - scanned) / partitions
                           / max(1.0, lab.agent_metrics(c)[fetches] - fetched))
        before = lab.agent_metrics(c)
        seq = int(lab.psql(f"SELECT tx_seq FROM pgvpn.link WHERE src = {src} AND dst = {dst}"))
        with psycopg.connect(lab.dsn(role(b.name)), autocommit=True) as conn:
            wire.register(conn)
            send(conn, src, dst, seq + 1, count=3, notify=False)
        logged = time.monotonic()
        delivered = None
        while time.monotonic() - logged < 5:
            # read and passed on (sealed, these hand-made rows are dropped as unsealable):
            # the receiver's cursor, committed within save_delay
            if int(lab.psql(f"SELECT rx_seq FROM pgvpn.cursor WHERE src = {src} "
                            f"AND dst = {dst}")) >= seq + 3:
                delivered = time.monotonic() - logged
                break
            time.sleep(0.05)
        after = lab.agent_metrics(c)
    finally:
        pump.halt()
        time.sleep(0.5)
        got = pump.stream.close()
    assert got == pump.accepted, "the busy link: every datagram once, in order"
    interval = lab.transport.get("poll_interval", 1.0)
    assert delivered is not None, "the unnotified batch was never delivered"
    assert delivered <= interval + 1.0, f"{delivered:.2f}s, more than a poll interval"
    woke = after[wakeups] - before[wakeups]
    assert woke >= 0.5 * delivered / 0.02, "c was woken by the busy link all along"
    if sealed:
        assert after["pgvpn_carried_packets_total"] > before["pgvpn_carried_packets_total"]
    else:
        # a wake-up reads the link it names; every link only once a poll interval (2.0: all)
        assert links_per_fetch < 1.4, f"{links_per_fetch:.2f} links read per fetch"
