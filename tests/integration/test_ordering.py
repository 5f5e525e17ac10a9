"""Delivery order and completeness when commits land out of order (DESIGN.md trap 1).

The senders and the receiver here are the agent's own classes, connected to a real PostgreSQL;
only the TUN device is replaced by a list, so the test decides exactly when each transaction
commits.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pgvpn_agent import config, db, tun
from pgvpn_agent.receiver import Receiver
from pgvpn_agent.sender import Sender
from pgvpn_agent.stopping import Stop
from tests.packets import ipv4, ports

pytestmark = pytest.mark.integration
UDP = 17


class ListTun:
    """Stands in for the TUN fd: records what the receiver writes."""

    fd = -1

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, packet: bytes, offload: bytes = tun.NO_OFFLOAD) -> bool:
        self.written.append(packet)
        return True


def packet(src: str, dst: str, n: int) -> tuple[float, bytes]:
    """As the sender reads it from TUN: an offload header first."""
    udp = ports(1000, 2000, b"\0\0\0\0" + b"%06d" % n)
    return time.time(), tun.NO_OFFLOAD + ipv4(src, dst, UDP, udp)


def number(p: bytes) -> int:
    return int(p[-6:])


@pytest.fixture
def peers(make_lab):
    lab = make_lab(peers=3, agents=False)
    stop = Stop()
    cfg = {p.name: config.load(p.config) for p in lab.peers}
    yield lab, cfg, stop
    stop.set()


def sender(cfg: config.Config, stop: Stop) -> Sender:
    s = Sender(cfg, ListTun(), stop)  # type: ignore[arg-type]
    s._connect()
    assert s.conn is not None
    return s


def receiver(cfg: config.Config, stop: Stop) -> tuple[Receiver, ListTun]:
    tun = ListTun()
    rx = Receiver(cfg, tun, stop)  # type: ignore[arg-type]
    rx._connect()
    return rx, tun


def test_late_commit_on_another_link_is_not_skipped(peers):
    lab, cfg, stop = peers
    p1, p2, p3 = lab.peers
    s1, s3 = sender(cfg["peer1"], stop), sender(cfg["peer3"], stop)
    rx, tun = receiver(cfg["peer2"], stop)

    # peer1 -> peer2 starts first and holds its transaction open ...
    s1.conn.autocommit = False
    s1._send_rows([packet(p1.ipv4, p2.ipv4, n) for n in range(1, 6)])
    # ... while peer3 -> peer2 commits after it.
    s3._send_rows([packet(p3.ipv4, p2.ipv4, n) for n in range(101, 104)])

    rx._fetch_all()
    assert [number(p) for p in tun.written] == [101, 102, 103]
    assert rx.cursor[s1.ids["peer1"]] == 0, "the uncommitted link must not move its cursor"

    s1.conn.commit()
    rx._fetch_all()
    rx._fetch_all()
    assert [number(p) for p in tun.written] == [101, 102, 103, 1, 2, 3, 4, 5]
    # No batch of peer2's went back to carry the cursors: the receiver commits them itself.
    time.sleep(rx.save_delay)
    rx._save_overdue()
    saved = lab.psql("SELECT string_agg(src || ':' || rx_seq, ',' ORDER BY src) FROM pgvpn.cursor "
                     f"WHERE dst = {s1.ids['peer2']}")
    assert saved == f"{s1.ids['peer1']}:5,{s1.ids['peer3']}:3"


def test_a_second_writer_on_one_link_cannot_interleave(peers):
    lab, cfg, stop = peers
    p1, p2, _ = lab.peers
    first = sender(cfg["peer1"], stop)
    # An impostor with the same peer name: it can only get past the advisory lock if the
    # first one's session is gone, so take the link row directly with a second session.
    second = Sender(cfg["peer1"], ListTun(), stop)  # type: ignore[arg-type]
    second.conn = db.connect(config.Database(dsn=first.conn.info.dsn), "impostor")
    second.ids, second.names, second.tx_seq = first.ids, first.names, dict(first.tx_seq)

    first.conn.autocommit = False
    first._send_rows([packet(p1.ipv4, p2.ipv4, n) for n in range(1, 4)])
    result: list[BaseException | None] = []

    def race() -> None:
        try:
            second._send_rows([packet(p1.ipv4, p2.ipv4, n) for n in range(50, 53)])
            result.append(None)
        except psycopg.Error as exc:
            result.append(exc)

    t = threading.Thread(target=race)
    t.start()
    time.sleep(0.5)
    assert t.is_alive(), "the second writer must wait for the first one's row lock"
    first.conn.commit()
    t.join(10)
    assert isinstance(result[0], psycopg.Error) and result[0].sqlstate == "PV001"
    seqs = lab.psql("SELECT string_agg(seq::text, ',' ORDER BY seq) FROM pgvpn.packet")
    assert seqs == "1,2,3"
    second.conn.close()


def test_many_concurrent_links_deliver_everything_in_order(peers):
    lab, cfg, stop = peers
    p1, p2, p3 = lab.peers
    s1, s3 = sender(cfg["peer1"], stop), sender(cfg["peer3"], stop)
    rx, tun = receiver(cfg["peer2"], stop)

    def pump(s: Sender, src: str, base: int) -> None:
        for batch in range(40):
            s._send_rows([packet(src, p2.ipv4, base + batch * 10 + i) for i in range(10)])

    threads = [threading.Thread(target=pump, args=(s1, p1.ipv4, 0)),
               threading.Thread(target=pump, args=(s3, p3.ipv4, 100_000))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rx._fetch_all()
    rx._fetch_all()
    got = [number(p) for p in tun.written]
    from_1 = [n for n in got if n < 100_000]
    from_3 = [n - 100_000 for n in got if n >= 100_000]
    assert from_1 == list(range(400)) and from_3 == list(range(400))
