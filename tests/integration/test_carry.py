"""Small packets ride in their batch's notification, sealed (schema v14) or boxed with their
link's carry key (v15): logged all the same, delivered without a fetch, and nothing someone else
NOTIFYs on the channel is delivered."""

from __future__ import annotations

import base64
import os
import threading
import time

import psycopg
import pytest

from pgvpn_agent import carried, carrybox
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
    exchange(lab, 1, 150)
    for i, peer in enumerate((b, a)):
        now = counter(lab, peer, "pgvpn_carried_packets_total") - carried[i]
        read = counter(lab, peer, "pgvpn_fetch_duration_seconds_count") - fetches[i]
        # (150 datagrams, the other stream's ACK-less replies: UDP; polls still fetch). A few
        # may come from the table instead on a loaded machine: a batch that found its packet
        # waiting, a wake-up handled after the next fetch; the table is the authority.
        assert now >= 145, f"{peer.name}: only {now} packets came with their notification"
        assert read < 50, f"{peer.name}: {read} fetches for 150 carried datagrams"
    # every one of them logged, and each receiver's committed cursor at its link's end
    for src, dst, port in ((a, b, PORT), (b, a, BACK)):
        assert lab.psql(f"SELECT count(*) FROM pgvpn.packet WHERE dst_port = {port}") == "150"
        eventually(lambda s=src, d=dst: cursor_at_end(lab, s, d), timeout=5)

    # The operator turns it off: the same traffic comes from the table alone.
    lab.psql("UPDATE pgvpn.limits SET carry_bytes = 0")
    before = counter(lab, b, "pgvpn_carried_packets_total")
    errors: list[BaseException] = []
    forth = Stream(lab, a, b, port=PORT)
    try:
        send_one_at_a_time(forth, 1, 20, errors)
    finally:
        assert forth.close() == list(range(1, 21))
    assert not errors, errors
    assert counter(lab, b, "pgvpn_carried_packets_total") == before


def exchange(lab: Lab, first: int, last: int) -> None:
    """Datagrams first..last each way, each its own batch, both ways at once: exactly once and
    in order."""
    a, b = lab.peers
    forth, back = Stream(lab, a, b, port=PORT), Stream(lab, b, a, port=BACK)
    errors: list[BaseException] = []
    threads = [threading.Thread(target=send_one_at_a_time, args=(s, first, last, errors))
               for s in (forth, back)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        got = [forth.close(), back.close()]
    assert not errors, errors
    assert got == [list(range(first, last + 1))] * 2, "exactly once, in order, both ways"


def carry_key(lab: Lab, src: LabPeer, dst: LabPeer) -> bytes:
    """As the superuser: no peer reads a key but its own incoming links' (test_security)."""
    return bytes.fromhex(lab.psql(
        "SELECT encode(k.key, 'hex') FROM pgvpn.carry_key k JOIN pgvpn.peer s ON s.id = k.src "
        f"JOIN pgvpn.peer d ON d.id = k.dst WHERE s.name = '{src.name}' "
        f"AND d.name = '{dst.name}'"))


def boxing(lab: Lab) -> None:
    """The operator lets small unsealed batches ride, boxed (off by default)."""
    lab.psql("UPDATE pgvpn.limits SET carry_unsealed = true")


def test_unsealed_packets_ride_only_once_the_operator_lets_them(make_lab):
    lab = make_lab(peers=2)
    b = lab.peers[1]
    fetches = counter(lab, b, "pgvpn_fetch_duration_seconds_count")
    exchange(lab, 1, 20)
    assert counter(lab, b, "pgvpn_carried_packets_total") == 0
    assert counter(lab, b, "pgvpn_fetch_duration_seconds_count") - fetches >= 20
    channel = lab.psql(f"SELECT channel FROM pgvpn.peer WHERE name = '{b.name}'")
    with psycopg.connect(lab.dsn(), autocommit=True) as spy:
        spy.execute(f'LISTEN "{channel}"')
        exchange(lab, 21, 25)
        texts = [n.payload for n in spy.notifies(timeout=1.0)]
    assert texts and all(t.count(":") == 1 and ";" not in t for t in texts), texts


def test_small_unsealed_packets_ride_boxed_both_ways_and_a_listener_reads_none(make_lab):
    lab = make_lab(peers=2)
    boxing(lab)
    a, b = lab.peers
    fetches = [counter(lab, p, "pgvpn_fetch_duration_seconds_count") for p in (b, a)]
    exchange(lab, 1, 150)
    for i, peer in enumerate((b, a)):
        now = counter(lab, peer, "pgvpn_carried_packets_total")
        read = counter(lab, peer, "pgvpn_fetch_duration_seconds_count") - fetches[i]
        assert now >= 145, f"{peer.name}: only {now} packets came with their notification"
        assert read < 50, f"{peer.name}: {read} fetches for 150 carried datagrams"
        assert counter(lab, peer, "pgvpn_carried_refused_total") == 0
    for src, dst, port in ((a, b, PORT), (b, a, BACK)):
        assert lab.psql(f"SELECT count(*) FROM pgvpn.packet WHERE dst_port = {port}") == "150"
        eventually(lambda s=src, d=dst: cursor_at_end(lab, s, d), timeout=5)

    # What the database sends: a box that a listener who knows the channel (here the
    # superuser) cannot read; opened with the link's key, exactly the rows the log holds.
    channel = lab.psql(f"SELECT channel FROM pgvpn.peer WHERE name = '{b.name}'")
    key = carry_key(lab, a, b)
    _, _, src = link(lab, a, b)
    dst = int(lab.psql(f"SELECT id FROM pgvpn.peer WHERE name = '{b.name}'"))
    timeline = int(lab.psql("SELECT pgvpn.timeline()"))
    errors: list[BaseException] = []
    with psycopg.connect(lab.dsn(), autocommit=True) as spy:
        spy.execute(f'LISTEN "{channel}"')
        stream = Stream(lab, a, b, port=PORT)
        try:
            send_one_at_a_time(stream, 151, 155, errors)
        finally:
            assert stream.close() == list(range(151, 156))
        texts = [n.payload for n in spy.notifies(timeout=1.0)]
    assert not errors, errors
    notes = [carried.parse(t) for t in texts]
    assert len(notes) >= 5 and all(n is not None and n.box for n in notes), texts
    for note in notes:
        assert note is not None and note.box is not None
        rows = carrybox.open_box(key, note.src, note.last, dst, timeline, note.box)
        assert rows is not None, f"the database's box does not open: {note}"
        logged = lab.psql(
            f"SELECT encode(payload, 'hex') FROM pgvpn.packet WHERE src_peer = {src} "
            f"AND dst_peer = {dst} AND seq BETWEEN {note.last - len(rows) + 1} AND {note.last} "
            "ORDER BY seq").split()
        assert [p.hex() for p, _ in rows] == logged
        assert all(p not in note.box for p, _ in rows), "a packet in the clear"
        assert carrybox.open_box(carry_key(lab, b, a), note.src, note.last, dst, timeline,
                                 note.box) is None, "the other link's key opened it"
        assert carrybox.open_box(key, note.src, note.last, dst, timeline + 1,
                                 note.box) is None, "it opened on another timeline"


def test_a_carry_key_made_anew_is_read_again_and_nothing_is_lost(make_lab):
    """The operator replaces a link's key: the first box under it does not open (the table is
    read instead), the receiver reads its keys again, and the next boxes open."""
    lab = make_lab(peers=2)
    boxing(lab)
    b = lab.peers[1]
    exchange(lab, 1, 10)
    lab.psql("UPDATE pgvpn.carry_key SET key = pgvpn_crypto.gen_random_bytes(64)")
    refused = counter(lab, b, "pgvpn_carried_refused_total")
    time.sleep(1.1)  # past the receivers' poll interval since they last read their keys
    exchange(lab, 11, 40)
    carried_before = counter(lab, b, "pgvpn_carried_packets_total")
    assert counter(lab, b, "pgvpn_carried_refused_total") >= refused + 1
    exchange(lab, 41, 60)
    assert counter(lab, b, "pgvpn_carried_packets_total") >= carried_before + 15


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


def test_a_box_someone_else_forged_delivers_nothing_and_moves_nothing(make_lab):
    """Who learned a receiver's channel can replay a real box at the next position, pass the
    other link's box off as this link's, or send bytes of its own: none opens, none moves the
    cursor, and the packets that follow arrive in order."""
    lab = make_lab(peers=2)
    boxing(lab)
    a, b = lab.peers
    channels = {p.name: lab.psql(f"SELECT channel FROM pgvpn.peer WHERE name = '{p.name}'")
                for p in (a, b)}
    with psycopg.connect(lab.dsn(), autocommit=True) as spy:
        for channel in channels.values():
            spy.execute(f'LISTEN "{channel}"')
        exchange(lab, 1, 3)
        texts = {n.channel: n.payload for n in spy.notifies(timeout=1.0)}
    mine, theirs = texts[channels[b.name]], texts[channels[a.name]]
    eventually(lambda: cursor_at_end(lab, a, b), timeout=5)
    tx, _, src = link(lab, a, b)
    box, other = mine.split(";")[1], theirs.split(";")[1]
    junk = base64.b64encode(os.urandom(len(base64.b64decode(box)))).decode()
    with psycopg.connect(lab.dsn(), autocommit=True) as forger:
        for text in (f"{src}:{tx + 1};{box}", f"{src}:{tx + 1};{other}",
                     f"{src}:{tx + 1};{junk}"):
            refused = counter(lab, b, "pgvpn_carried_refused_total")
            forger.execute("SELECT pg_notify(%s, %s)", (channels[b.name], text))

            def seen(was: float = refused) -> None:
                assert counter(lab, b, "pgvpn_carried_refused_total") == was + 1
            eventually(seen, timeout=5)
    # had any moved the receiver's cursor, the next real packet (tx + 1) were skipped
    stream = Stream(lab, a, b, port=PORT)
    errors: list[BaseException] = []
    try:
        send_one_at_a_time(stream, 4, 10, errors)
    finally:
        got = stream.close()
    assert not errors, errors
    assert got == list(range(4, 11))
    assert link(lab, a, b)[0] == tx + 7
    eventually(lambda: cursor_at_end(lab, a, b), timeout=5)
