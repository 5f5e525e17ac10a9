"""Agent behaviour around the edges: shutdown, routing misses, stale packets, outages, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import psycopg
import pytest

from pgvpn_agent import config, db, schema, tun
from pgvpn_agent.lab import Lab, LabPeer
from pgvpn_agent.receiver import Receiver
from pgvpn_agent.sender import Sender
from pgvpn_agent.stopping import Stop
from tests.integration.stream import Stream, eventually
from tests.packets import ipv4, ports

pytestmark = pytest.mark.integration


def dropped(lab: Lab, peer: LabPeer, reason: str) -> float:
    return lab.agent_metrics(peer).get(f'pgvpn_packets_dropped_total{{reason="{reason}"}}', 0.0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tun_exists(lab: Lab, peer: LabPeer) -> bool:
    return lab.exec(peer, ["ip", "link", "show", peer.tun]).returncode == 0


@pytest.mark.parametrize("mode", ["logged", "payload"])
def test_sigterm_removes_the_tun_device_and_exits_cleanly(make_lab, mode):
    """At once, not at the end of a poll interval: both threads wait in select() on the stop
    request as well (stopping.py), so a restart costs the tunnel no idle second."""
    lab = make_lab(peers=2, mode=mode, transport={"poll_interval": 5.0})
    a, b = lab.peers
    assert tun_exists(lab, a)
    assert lab.ping(a, b)
    time.sleep(0.5)  # idle: both threads are inside their waits
    started = time.monotonic()
    os.kill(a.pid, signal.SIGTERM)
    _, status = os.waitpid(a.pid, 0)
    took = time.monotonic() - started
    assert os.waitstatus_to_exitcode(status) == 0
    assert took < 2.0, f"{took:.2f}s to stop with a 5 s poll interval"
    assert not tun_exists(lab, a)
    assert "stopped, pgvpn0 removed" in Path(a.log).read_text()


def test_unknown_destination_is_dropped_and_counted_not_logged(make_lab):
    lab = make_lab(peers=2)
    a, _ = lab.peers
    before = int(lab.psql("SELECT count(*) FROM pgvpn.packet"))
    lab.exec(a, ["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.77.0.99"])
    lab.exec(a, ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", "fd77::99"])
    eventually(lambda: _assert_at_least(dropped(lab, a, "no_route"), 5))
    assert lab.psql("SELECT count(*) FROM pgvpn.packet WHERE host(dst_addr) IN "
                    "('10.77.0.99', 'fd77::99')") == "0"
    assert int(lab.psql("SELECT count(*) FROM pgvpn.packet")) == before


def _assert_at_least(value: float, minimum: float) -> None:
    assert value >= minimum, value


def test_packets_older_than_max_age_are_logged_but_not_delivered(make_lab):
    lab = make_lab(peers=2, transport={"max_age": 1.0})
    a, b = lab.peers
    lab.stop_agent(b)
    stream = Stream(lab, a, b, port=7100)
    for n in range(1, 11):
        assert stream.send(n)
    time.sleep(2.0)
    lab.start_agent(b)
    lab.wait_mesh(timeout=30)
    eventually(lambda: _assert_at_least(dropped(lab, b, "too_old"), 10))
    stream.send(11)
    assert stream.wait_for(11, timeout=10)
    assert stream.close() == [11], "stale packets must not be delivered"
    assert lab.psql("SELECT count(*) FROM pgvpn.packet WHERE dst_port = 7100") == "11"


def test_database_outage_queues_drops_oldest_and_does_not_spin(make_lab):
    lab = make_lab(peers=2, transport={"queue_max": 50, "max_age": 120.0})
    a, b = lab.peers
    stream = Stream(lab, a, b, port=7200)
    lab.stop_postgres()
    cpu_before = cpu_seconds(a.pid)
    for n in range(1, 201):
        assert stream.send(n)
        time.sleep(0.01)
    time.sleep(1.0)
    spent = cpu_seconds(a.pid) - cpu_before
    lab.start_postgres()
    eventually(lambda: _assert_at_least(len(stream.received), 50), timeout=30)
    time.sleep(1.0)
    received = stream.close()
    # The newest packets survived the outage (the queue also holds the odd IPv6 control
    # packet), the oldest ones were dropped and counted; the batch in flight when the database
    # went away (datagram 1) was kept and sent after the reconnect.
    assert len(received) == len(set(received))
    assert set(range(160, 201)) <= set(received) <= {1, *range(140, 201)}
    assert dropped(lab, a, "queue_full") >= 140
    assert spent < 1.5, f"agent burnt {spent:.2f}s of CPU during a 3s outage"
    log = Path(a.log).read_text()
    assert "database unavailable" in log or "database error" in log
    assert "database connection restored" in log


def test_lost_notification_costs_latency_not_packets(make_lab):
    lab = make_lab(peers=2, agents=False, transport={"poll_interval": 0.3})
    a, b = lab.peers
    stop = Stop()
    cfg_a, cfg_b = config.load(a.config), config.load(b.config)

    class ListTun:
        fd = -1
        written: ClassVar[list[bytes]] = []

        def write(self, packet: bytes, offload: bytes = tun.NO_OFFLOAD) -> bool:
            self.written.append(packet)
            return True

    rx = Receiver(cfg_b, ListTun(), stop)  # type: ignore[arg-type]
    thread = threading.Thread(target=rx.run)
    thread.start()
    try:
        tx = Sender(cfg_a, ListTun(), stop)  # type: ignore[arg-type]
        tx._connect()
        tx.notify = False  # as if the NOTIFY had been lost
        packet = ipv4(a.ipv4, b.ipv4, 17, ports(1, 2))
        started = time.monotonic()
        tx._send_rows([(time.time(), tun.NO_OFFLOAD + packet)])
        eventually(lambda: _assert_at_least(len(ListTun.written), 1), timeout=5)
        assert ListTun.written == [packet]
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        thread.join(5)


def test_migrate_is_idempotent_and_payload_is_stored_external(make_lab):
    lab = make_lab(peers=2, agents=False)
    with db.connect(config.Database(dsn=lab.dsn()), "test") as conn:
        assert schema.migrate(conn) == []
        assert schema.current_version(conn) == schema.LATEST
    storage = lab.psql(
        "SELECT DISTINCT a.attstorage FROM pg_attribute a JOIN pg_inherits i "
        "ON i.inhrelid = a.attrelid WHERE i.inhparent = 'pgvpn.packet'::regclass "
        "AND a.attname = 'payload'")
    assert storage == "e"
    parts = int(lab.psql("SELECT count(*) FROM pg_inherits "
                         "WHERE inhparent = 'pgvpn.packet'::regclass"))
    assert parts >= 4  # yesterday, today, two days ahead (+ default)


def test_wrong_credentials_are_reported_and_retried(make_lab):
    lab = make_lab(peers=2, agents=False)
    a = lab.peers[0]
    bad = Path(a.config).read_text().replace("user=pgvpn_peer1", "user=nobody")
    Path(a.config).write_text(bad)
    lab.start_agent(a)
    try:
        eventually(lambda: _assert_in('role "nobody" does not exist', Path(a.log).read_text()))
        time.sleep(1.0)
        assert Path(a.log).read_text().count("retrying in") < 15, "reconnects must back off"
    finally:
        lab.stop_agent(a)


def _assert_in(needle: str, haystack: str) -> None:
    assert needle in haystack


def test_lab_cli_up_status_down(tmp_path_factory):
    workdir = Path(tmp_path_factory.mktemp("labcli"))
    workdir.chmod(0o755)
    os.chmod(workdir.parent, 0o755)
    os.chmod(workdir.parent.parent, 0o755)
    cli = [sys.executable, "-m", "pgvpn_agent", "lab"]
    try:
        subprocess.run([*cli, "up", "--dir", str(workdir), "--peers", "2"], check=True,
                       capture_output=True, timeout=120)
        status = json.loads(subprocess.run([*cli, "status", "--json", "--dir", str(workdir)],
                                           check=True, capture_output=True, text=True).stdout)
        assert set(status) >= {"dsn", "peers"}
        assert [p["name"] for p in status["peers"]] == ["peer1", "peer2"]
        for p in status["peers"]:
            assert {"name", "netns", "ipv4", "ipv6", "tun"} <= set(p) and p["running"]
        with psycopg.connect(status["dsn"]) as conn:
            assert conn.execute("SELECT count(*) FROM pgvpn.peer").fetchone() == (2,)
    finally:
        subprocess.run([*cli, "down", "--dir", str(workdir)], capture_output=True)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pgvpn-lab1" not in netns and not workdir.exists()
