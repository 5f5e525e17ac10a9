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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pgvpn_agent.lab import Lab
from tests.integration.pump import Pump, back_after
from tests.integration.standby import Standby, with_standby

pytestmark = pytest.mark.integration


@contextmanager
def failover_lab(make_lab: Any, port: int) -> Iterator[tuple[Lab, Standby, Pump, Pump]]:
    """Two agents whose dsn names the lab's cluster and its synchronous standby, numbered
    datagrams both ways (ports `port` and `port` + 1); the standby stopped at the end."""
    lab = make_lab(peers=2, agents=False, transport={"max_age": 300.0})
    a, b = lab.peers
    standby = Standby(lab)
    try:
        with_standby(lab, standby)
        yield lab, standby, Pump(lab, a, b, port=port, every=0.01), Pump(lab, b, a,
                                                                          port=port + 1,
                                                                          every=0.01)
    finally:
        standby.stop()


def test_agents_follow_a_failover_to_the_synchronous_standby(make_lab):
    with failover_lab(make_lab, 7501) as (lab, standby, ab, ba):
        a, b = lab.peers
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


def test_commits_only_the_old_primary_had_arrive_once(make_lab):
    """The standby stops confirming; the senders' sessions are ended while their commits wait
    for it, so those commits become visible on the primary alone (and are delivered from it);
    then the primary dies with more batches waiting, and the standby is promoted without any of
    them. A batch the sender never saw committed is sent again with its own sequence numbers
    (a receiver that read it on the old primary skips it); one it saw committed is gone from
    its memory, so its link moves past it. Either way: nothing delivered twice, in order."""
    with failover_lab(make_lab, 7511) as (lab, standby, ab, ba):
        a, b = lab.peers
        time.sleep(1.0)
        standby.stop("fast")  # commits now wait for it
        time.sleep(0.5)
        ended = lab.psql("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM "
                         "pg_stat_activity WHERE application_name LIKE 'pgvpn-%-tx' "
                         "AND wait_event = 'SyncRep'")
        assert int(ended) >= 1, "no sender was waiting for the standby"
        time.sleep(1.0)  # reconnected; their next batches wait again
        failed = time.monotonic()
        before = [set(p.stream.received) for p in (ab, ba)]  # read on the old primary
        lab.stop_postgres("immediate")
        standby.start()
        standby.promote()
        lab.port = standby.port
        back = back_after([ab, ba], failed)
        time.sleep(1.0)
        sent_again: set[int] = set()
        skipped_past: set[int] = set()
        for pump, early in zip((ab, ba), before, strict=True):
            logged, received, _ = pump.finish(unlogged=True)
            assert received == sorted(set(received)), "a datagram came twice or out of order"
            # logged again on the new primary, after its start, though delivered before it
            again = {n for n in _logged_after_start(lab, pump.port) if n in early}
            sent_again |= {(pump.port, n) for n in again}
            skipped_past |= {(pump.port, n) for n in set(received) - set(logged)}
        skipped = replayed = 0.0
        for peer, other in ((a, b), (b, a)):
            m = lab.agent_metrics(peer)
            skipped += m[f'pgvpn_sequence_regressions_total{{peer="{other.name}"}}']
            replayed += m["pgvpn_in_doubt_batches_replayed_total"]
        print(f"\nold primary only: {len(sent_again) + len(skipped_past)} datagrams delivered "
              f"from commits the new primary lacked: {len(sent_again)} logged again with their "
              f"own numbers ({replayed:.0f} batches) and not delivered twice, "
              f"{len(skipped_past)} skipped past ({skipped:.0f} links); first new datagram "
              f"{back[0] - failed:.2f}s (a->b), {back[1] - failed:.2f}s (b->a) after the "
              "primary died")
        assert sent_again or skipped_past, "no receiver read a commit the new primary lacks"
        if sent_again:
            assert replayed >= 1
        if skipped_past:
            assert skipped >= 1 and int(lab.psql(
                "SELECT count(*) FROM pgvpn.link_advance")) >= 1, "no sender moved past them"


def _logged_after_start(lab: Lab, port: int) -> list[int]:
    """Datagram numbers to `port` logged on the (new) primary since its server started."""
    rows = lab.psql(f"SELECT string_agg(split_part(convert_from(substr(payload, 29), 'SQL_ASCII'),"
                    f" ' ', 1), ',') FROM pgvpn.packet WHERE dst_port = {port} "
                    "AND logged_at > pg_postmaster_start_time()")
    return [int(n) for n in rows.split(",") if n]
