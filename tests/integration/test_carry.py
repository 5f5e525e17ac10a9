"""Small sealed packets ride in their batch's notification (schema v14): logged all the same,
delivered without a fetch, and nothing someone else NOTIFYs on the channel is delivered."""

from __future__ import annotations

import base64
import os
import threading
import time

import psycopg
import pytest

from pgvpn_agent.lab import Lab, LabPeer
from tests.integration.stream import Stream, eventually

pytestmark = pytest.mark.integration

PORT = 7791
BACK = 7792


def counter(lab: Lab, peer: LabPeer, name: str) -> float:
    return lab.agent_metrics(peer).get(name, 0.0)


def send_one_at_a_time(stream: Stream, first: int, last: int, errors: list[BaseException]) -> None:
    """Each datagram its own batch: sent once the one before it arrived."""
    try:
        for n in range(first, last + 1):
            assert stream.send(n)
            assert stream.wait_for(n, timeout=5), f"datagram {n} did not arrive in 5 s"
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


def link(lab: Lab, src: LabPeer, dst: LabPeer) -> tuple[int, int, int]:
    """tx_seq of the link and rx_seq of its cursor, by the database; and the source's id."""
    row = lab.psql(
        "SELECT l.tx_seq, c.rx_seq, l.src FROM pgvpn.link l JOIN pgvpn.cursor c USING (src, dst) "
        f"JOIN pgvpn.peer s ON s.id = l.src JOIN pgvpn.peer d ON d.id = l.dst "
        f"WHERE s.name = '{src.name}' AND d.name = '{dst.name}'")
    tx, rx, sid = (int(x) for x in row.split("|"))
    return tx, rx, sid


def cursor_at_end(lab: Lab, src: LabPeer, dst: LabPeer) -> None:
    tx, rx, _ = link(lab, src, dst)
    assert tx == rx, f"cursor {rx} behind the link's {tx}"


def test_small_sealed_packets_ride_in_the_notification_both_ways_in_order(make_lab):
    lab = make_lab(peers=2, encrypt=True)
    a, b = lab.peers
    fetches = [counter(lab, p, "pgvpn_fetch_duration_seconds_count") for p in (b, a)]
    carried = [counter(lab, p, "pgvpn_carried_packets_total") for p in (b, a)]
    forth, back = Stream(lab, a, b, port=PORT), Stream(lab, b, a, port=BACK)
    errors: list[BaseException] = []
    threads = [threading.Thread(target=send_one_at_a_time, args=(s, 1, 150, errors))
               for s in (forth, back)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        got = [forth.close(), back.close()]
    assert not errors, errors
    assert got == [list(range(1, 151))] * 2, "exactly once, in order, both ways"
    for i, peer in enumerate((b, a)):
        now = counter(lab, peer, "pgvpn_carried_packets_total") - carried[i]
        read = counter(lab, peer, "pgvpn_fetch_duration_seconds_count") - fetches[i]
        # (150 datagrams, the other stream's ACK-less replies: UDP; polls still fetch)
        assert now >= 150, f"{peer.name}: only {now} packets came with their notification"
        assert read < 50, f"{peer.name}: {read} fetches for 150 carried datagrams"
    # every one of them logged, and each receiver's committed cursor at its link's end
    for src, dst, port in ((a, b, PORT), (b, a, BACK)):
        assert lab.psql(f"SELECT count(*) FROM pgvpn.packet WHERE dst_port = {port}") == "150"
        eventually(lambda s=src, d=dst: cursor_at_end(lab, s, d), timeout=5)

    # The operator turns it off: the same traffic comes from the table alone.
    lab.psql("UPDATE pgvpn.limits SET carry_bytes = 0")
    before = counter(lab, b, "pgvpn_carried_packets_total")
    forth = Stream(lab, a, b, port=PORT)
    try:
        send_one_at_a_time(forth, 1, 20, errors)
    finally:
        assert forth.close() == list(range(1, 21))
    assert not errors, errors
    assert counter(lab, b, "pgvpn_carried_packets_total") == before


def test_unsealed_packets_never_ride_in_a_notification(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    stream = Stream(lab, a, b, port=PORT)
    errors: list[BaseException] = []
    try:
        send_one_at_a_time(stream, 1, 20, errors)
    finally:
        assert stream.close() == list(range(1, 21))
    assert not errors, errors
    assert counter(lab, b, "pgvpn_carried_packets_total") == 0
    # what the database sends: the wake-up alone (a listener other than the receiver, here
    # the superuser who knows the channel, reads no packet from it)
    channel = lab.psql(f"SELECT channel FROM pgvpn.peer WHERE name = '{b.name}'")
    with psycopg.connect(lab.dsn(), autocommit=True) as spy:
        spy.execute(f'LISTEN "{channel}"')
        stream = Stream(lab, a, b, port=PORT)
        try:
            send_one_at_a_time(stream, 21, 25, errors)
        finally:
            stream.close()
        texts = [n.payload for n in spy.notifies(timeout=1.0)]
    assert texts and all(t.count(":") == 1 for t in texts), texts


def test_a_notification_someone_else_forged_delivers_nothing_and_moves_nothing(make_lab):
    lab = make_lab(peers=2, encrypt=True)
    a, b = lab.peers
    stream = Stream(lab, a, b, port=PORT)
    errors: list[BaseException] = []
    try:
        send_one_at_a_time(stream, 1, 5, errors)
        eventually(lambda: cursor_at_end(lab, a, b), timeout=5)
        tx, _, src = link(lab, a, b)
        channel = lab.psql(f"SELECT channel FROM pgvpn.peer WHERE name = '{b.name}'")
        # a real sealed row of this link, relabelled as the next one; and random bytes
        old = lab.psql(f"SELECT encode(payload, 'base64') FROM pgvpn.packet "
                       f"WHERE src_peer = {src} AND dst_port = {PORT} ORDER BY seq LIMIT 1")
        junk = base64.b64encode(os.urandom(len(base64.b64decode(old)))).decode()
        with psycopg.connect(lab.dsn(), autocommit=True) as forger:
            for rows in (old.replace("\n", ""), junk):
                refused = counter(lab, b, "pgvpn_carried_refused_total")
                forger.execute("SELECT pg_notify(%s, %s)", (channel, f"{src}:{tx + 1}:{rows}"))

                def seen(was: float = refused) -> None:
                    assert counter(lab, b, "pgvpn_carried_refused_total") == was + 1
                eventually(seen, timeout=5)
        # had either moved the receiver's cursor, the next real packet (tx + 1) were skipped
        send_one_at_a_time(stream, 6, 10, errors)
    finally:
        got = stream.close()
    assert not errors, errors
    assert got == list(range(1, 11))
    time.sleep(0.2)
    assert link(lab, a, b)[0] == tx + 5
