"""The agents follow a failover: the primary dies, its synchronous standby is promoted.

The lab's cluster gets a streaming standby (pg_basebackup) that every commit waits for
(synchronous_standby_names = '*'); the agents' dsn lists both servers
(`host=…,… port=P1,P2`, target_session_attrs=read-write by default). With numbered datagrams
flowing both ways, the primary is stopped at once (immediate: no shutdown checkpoint, nothing
sent) and the standby promoted, as Patroni would. The agents must find the new primary on their
own, notice the new timeline, and deliver every datagram whose commit their sender saw
acknowledged exactly once and in order. A batch in flight at the failover — committed on the old
primary and perhaps read there, never confirmed — is in doubt: not sent again, its numbers not
used again, so it arrives at most once. The time from the failover to the first new datagram
each way is printed. (molecule/ha does the same under Patroni on machines of their own.)
"""

from __future__ import annotations

import time

import pytest

from tests.integration.pump import Pump, back_after
from tests.integration.standby import Standby, with_standby

pytestmark = pytest.mark.integration


def test_agents_follow_a_failover_to_the_synchronous_standby(make_lab):
    lab = make_lab(peers=2, agents=False, transport={"max_age": 300.0})
    a, b = lab.peers
    standby = Standby(lab)
    try:
        with_standby(lab, standby)
        ab, ba = Pump(lab, a, b, port=7501, every=0.01), Pump(lab, b, a, port=7502, every=0.01)
        time.sleep(2.0)
        failed = time.monotonic()
        lab.stop_postgres("immediate")
        standby.promote()
        promoted = time.monotonic()
        lab.port = standby.port  # the lab's own queries go to the new primary from here on
        back = back_after([ab, ba], failed)
        time.sleep(1.0)
        report = []
        for pump in (ab, ba):
            # every datagram on the new primary (its commit confirmed by the standby, or made
            # there) arrives; others arrived only if read on the old primary before it died
            logged, received, _ = pump.finish(unlogged=True)
            assert received == sorted(set(received)), "a datagram came twice or out of order"
            unconfirmed = sorted(set(received) - set(logged))
            report.append(f"{len(logged)} logged, {len(unconfirmed)} read on the old primary "
                          f"only, {len(set(pump.accepted) - set(received))} taken by the "
                          f"kernel and not delivered")
        for peer in (a, b):
            m = lab.agent_metrics(peer)
            assert m["pgvpn_db_timeline"] == 2, m
            assert m["pgvpn_db_timeline_changes_total"] == 1, m
            for d in ("tx", "rx"):
                assert m[f'pgvpn_db_reconnects_total{{direction="{d}"}}'] >= 1, m
        print(f"\nfailover: promoted {promoted - failed:.2f}s after the primary died; first "
              f"new datagram {back[0] - failed:.2f}s (a->b), {back[1] - failed:.2f}s (b->a) "
              f"after it; a->b: {report[0]}; b->a: {report[1]}")
        assert lab.ping(a, b) and lab.ping(b, a, v6=True)
    finally:
        standby.stop()


def test_commits_only_the_old_primary_had_are_neither_repeated_nor_reused(make_lab):
    """The standby stops confirming; the senders' sessions are ended while their commits wait
    for it, so those commits become visible on the primary alone (and are delivered from it);
    then the primary dies with more batches waiting, and the standby is promoted without any of
    them. The senders must move their links past every number a receiver may have read, drop
    the batch in doubt, and go on: nothing delivered twice, nothing skipped, in order."""
    lab = make_lab(peers=2, agents=False, transport={"max_age": 300.0})
    a, b = lab.peers
    standby = Standby(lab)
    try:
        with_standby(lab, standby)
        ab, ba = Pump(lab, a, b, port=7511, every=0.01), Pump(lab, b, a, port=7512, every=0.01)
        time.sleep(1.0)
        standby.stop("fast")  # commits now wait for it
        time.sleep(0.5)
        ended = lab.psql("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM "
                         "pg_stat_activity WHERE application_name LIKE 'pgvpn-%-tx' "
                         "AND wait_event = 'SyncRep'")
        assert int(ended) >= 1, "no sender was waiting for the standby"
        time.sleep(1.0)  # reconnected; their next batches wait again
        failed = time.monotonic()
        lab.stop_postgres("immediate")
        standby.start()
        standby.promote()
        lab.port = standby.port
        back = back_after([ab, ba], failed)
        time.sleep(1.0)
        unconfirmed = 0
        for pump in (ab, ba):
            logged, received, _ = pump.finish(unlogged=True)
            assert received == sorted(set(received)), "a datagram came twice or out of order"
            unconfirmed += len(set(received) - set(logged))
        skipped = in_doubt = 0.0
        for peer, other in ((a, b), (b, a)):
            m = lab.agent_metrics(peer)
            skipped += m[f'pgvpn_sequence_regressions_total{{peer="{other.name}"}}']
            in_doubt += m['pgvpn_commits_in_doubt_total{cause="in_flight"}']
        print(f"\nold primary only: {unconfirmed} datagrams delivered from commits the new "
              f"primary lacks; {skipped:.0f} links moved past them, {in_doubt:.0f} batches in "
              f"doubt dropped; first new datagram {back[0] - failed:.2f}s (a->b), "
              f"{back[1] - failed:.2f}s (b->a) after the primary died")
        assert unconfirmed >= 1, "no receiver read a commit the new primary lacks"
        assert skipped + in_doubt >= 1 and int(lab.psql(
            "SELECT count(*) FROM pgvpn.link_advance")) >= 1, "no sender moved past them"
    finally:
        standby.stop()
