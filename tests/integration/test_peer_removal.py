"""Removing a peer is an operation, not an outage, and its name may come back.

`pgvpn db remove` takes a peer's links, cursors and login role away while the others keep
talking; every row it sent or received stays in the log. Registered again, the name keeps its id
and each of its links continues the sequence where it stopped: a link that restarted at 1 would
put a second row with the same (src_peer, dst_peer, seq) in the log, and a receiver whose cursor
was past it would never deliver the new one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgvpn_agent import wire
from pgvpn_agent.lab import Lab
from pgvpn_agent.labstandby import sync_standbys
from tests.integration.hostile import send
from tests.integration.stream import Stream, deliver, eventually

pytestmark = pytest.mark.integration
PGVPN = [sys.executable, "-m", "pgvpn_agent"]
DENIED = "42501"
BAD_INPUT = "PV003"


def test_a_removed_peer_leaves_the_others_untouched_and_comes_back_in_sequence(make_lab):
    lab = make_lab(peers=3)
    p1, p2, p3 = lab.peers
    peer3 = lab.psql("SELECT id FROM pgvpn.peer WHERE name = 'peer3'")
    involved = f"{peer3} IN (src_peer, dst_peer)"
    others = Stream(lab, p1, p2, port=7101)  # between the two that stay
    leaving = Stream(lab, p3, p1, port=7102)  # from the one removed
    # to the one removed: peer1's batches hold packets for peer2 and peer3 at once
    toward = Stream(lab, p1, p3, port=7103)
    for n in range(1, 101):
        assert others.send(n) and leaving.send(n)
    leaving.wait_count(100, timeout=10)
    assert leaving.received == list(range(1, 101))

    # Both streams keep sending, 200 datagrams a second each, while the operator removes peer3.
    stop = threading.Event()
    sent = [100]

    def traffic() -> None:
        while not stop.is_set():
            sent[0] += 1
            others.send(sent[0])
            leaving.send(sent[0])
            toward.send(sent[0])
            time.sleep(0.005)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        time.sleep(0.5)
        removal = subprocess.run([*PGVPN, "db", "remove", "--dsn", lab.dsn(), "peer3"],
                                 capture_output=True, text=True)
        assert removal.returncode == 0, removal.stderr
        out = removal.stdout
        time.sleep(1.0)
    finally:
        stop.set()
        sender.join()
    assert "peer peer3 removed" in out and "role pgvpn_peer3 dropped" in out, out
    assert "2 sessions ended" in out, out

    # The others' tunnel: every datagram, once, in order; neither agent lost its connection.
    others.wait_count(sent[0], timeout=10)
    assert others.received == list(range(1, sent[0] + 1))
    # peer1's batch in flight when peer3's links went is sent again without peer3's packets
    assert lab.agent_metrics(p1)['pgvpn_packets_dropped_total{reason="db_error"}'] == 0
    toward.close()
    for peer in (p1, p2):
        m = lab.agent_metrics(peer)
        for direction in ("tx", "rx"):
            assert m[f'pgvpn_db_reconnects_total{{direction="{direction}"}}'] == 0, peer.name
    # What peer3 logged before the removal still arrives, in order, then nothing more.
    time.sleep(1.0)
    assert leaving.received == list(range(1, len(leaving.received) + 1))
    assert len(leaving.received) < sent[0], "peer3 was still carried after its removal"

    # Its links, cursors and role are gone; its rows, both ways, are not.
    assert lab.psql(f"SELECT count(*) FROM pgvpn.link WHERE {peer3} IN (src, dst)") == "0"
    assert lab.psql(f"SELECT count(*) FROM pgvpn.cursor WHERE {peer3} IN (src, dst)") == "0"
    assert lab.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'pgvpn_peer3'") == "0"
    assert lab.psql("SELECT removed_at IS NOT NULL AND revoked_at IS NOT NULL FROM pgvpn.peer "
                    "WHERE name = 'peer3'") == "t"
    rows = lab.psql(f"SELECT count(*) FILTER (WHERE src_peer = {peer3}), "
                    f"count(*) FILTER (WHERE dst_peer = {peer3}) FROM pgvpn.packet")
    sent_rows, received_rows = map(int, rows.split("|"))
    assert sent_rows >= len(leaving.received) and received_rows > 0, rows
    # Its agent is refused at its reconnect, and says why. (Its sender, whose links are gone,
    # has nothing left to send: it learns of the ended session only when it next needs one.)
    eventually(lambda: _contains(Path(p3.log), 'role "pgvpn_peer3" does not exist'))
    assert lab.agent_metrics(p3)['pgvpn_db_up{direction="rx"}'] == 0
    # Removing it again changes nothing; a name never registered is a clear error.
    again = subprocess.run([*PGVPN, "db", "remove", "--dsn", lab.dsn(), "peer3"],
                           capture_output=True, text=True, check=True).stdout
    assert "role pgvpn_peer3 gone already, 0 sessions ended" in again, again
    unknown = subprocess.run([*PGVPN, "db", "remove", "--dsn", lab.dsn(), "peer9"],
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "no peer named peer9" in unknown.stderr, unknown.stderr
    lab.stop_agent(p3)  # its host is decommissioned

    # The name comes back (a rebuilt host): same id, each link where its sequence stopped.
    retired = _links(lab, "SELECT src, dst, tx_seq FROM pgvpn.link_retired")
    assert len(retired) == 4 and min(retired.values()) > 0, retired
    back = lab.psql("SELECT now()")
    lab.psql("CREATE ROLE pgvpn_peer3 LOGIN CONNECTION LIMIT 8 IN ROLE pgvpn_agent")
    out = subprocess.run([*PGVPN, "db", "register", "--dsn", lab.dsn("pgvpn_housekeeping"),
                          "peer1", "peer2", "peer3"], capture_output=True, text=True,
                         check=True).stdout
    assert f"peer3={peer3}" in out, out
    assert _links(lab, f"SELECT src, dst, tx_seq FROM pgvpn.link WHERE {peer3} IN (src, dst)") \
        == retired
    assert _links(lab, f"SELECT src, dst, rx_seq FROM pgvpn.cursor WHERE {peer3} IN (src, dst)") \
        == retired
    assert lab.psql("SELECT count(*) FROM pgvpn.link_retired") == "0"
    lab.start_agent(p3)
    eventually(lambda: _assert(lab.ping(p3, p1) and lab.ping(p1, p3)), timeout=30)

    # peer1's agent ran throughout: it continues its links with peer3 without a restart, and
    # neither side sees a hole or a sequence number twice.
    assert deliver(lab, p3, p1, port=7103, count=50) == list(range(1, 51))
    assert deliver(lab, p1, p3, port=7104, count=50) == list(range(1, 51))
    assert lab.psql(f"SELECT count(*) FROM (SELECT FROM pgvpn.packet WHERE {involved} "
                    "GROUP BY src_peer, dst_peer, seq HAVING count(*) > 1) AS twice") == "0"
    after = _links(lab, f"SELECT src_peer, dst_peer, min(seq) FROM pgvpn.packet WHERE {involved} "
                        f"AND logged_at > '{back}' GROUP BY 1, 2")
    assert after and all(first == retired[link] + 1 for link, first in after.items()), after
    for peer, remote in ((p1, "peer3"), (p3, "peer1")):
        m = lab.agent_metrics(peer)
        assert m.get(f'pgvpn_sequence_gap_packets_total{{peer="{remote}"}}', 0) == 0, peer.name
    assert lab.agent_metrics(p1)['pgvpn_db_reconnects_total{direction="tx"}'] == 0
    others.close()
    leaving.close()


def test_only_an_operator_removes_and_what_it_keeps(make_lab):
    lab = make_lab(peers=3, agents=False)
    ids = dict(r.split("|") for r in lab.psql("SELECT name, id FROM pgvpn.peer").splitlines())
    lab.psql("CREATE ROLE removal_operator LOGIN IN ROLE pgvpn_operator; "
             "CREATE ROLE removal_reader LOGIN IN ROLE pgvpn_reader")
    for login in ("pgvpn_peer1", "removal_reader"):
        with _login(lab, login) as conn:
            assert _refused(conn, "SELECT pgvpn.remove_peer('peer2')") == DENIED, login
    with _login(lab, "removal_operator") as conn:
        for bad in (None, "x" * 51, "nobody"):
            assert _refused(conn, "SELECT pgvpn.remove_peer(%s)", (bad,)) == BAD_INPUT, bad

    # A batch in flight on a link being removed commits first; the sequence kept is its last.
    with _login(lab, "pgvpn_peer1") as peer, _login(lab, "removal_operator") as operator:
        peer.execute("BEGIN")
        send(peer, int(ids["peer1"]), int(ids["peer3"]), 1, 7, notify=False)
        removing = threading.Thread(
            target=lambda: operator.execute("SELECT pgvpn.remove_peer('peer3')"))
        removing.start()
        time.sleep(0.5)
        assert removing.is_alive(), "remove_peer() did not wait for the batch in flight"
        peer.execute("COMMIT")
        removing.join(10)
    retired = _links(lab, "SELECT src, dst, tx_seq FROM pgvpn.link_retired")
    assert retired[(int(ids["peer1"]), int(ids["peer3"]))] == 7, retired
    assert lab.psql("SELECT count(*) FROM pgvpn.packet WHERE seq <= 7") == "7"

    # pgvpn db remove drops the role, which takes a superuser.
    denied = subprocess.run([*PGVPN, "db", "remove", "--dsn", lab.dsn("removal_operator"),
                             "peer3"], capture_output=True, text=True)
    assert denied.returncode == 2 and "must run as a superuser" in denied.stderr
    # A role that owns something elsewhere: the peer is removed, the error says what is left.
    lab.psql("CREATE TABLE public.removal_leftover (); "
             "ALTER TABLE public.removal_leftover OWNER TO pgvpn_peer3")
    leftover = lab.dsn().replace("dbname=pgvpn", "dbname=postgres")
    subprocess.run(["psql", "-X", "-q", "-d", leftover, "-c",
                    "CREATE TABLE removal_elsewhere (); "
                    "ALTER TABLE removal_elsewhere OWNER TO pgvpn_peer3"], check=True)
    blocked = subprocess.run([*PGVPN, "db", "remove", "--dsn", lab.dsn(), "peer3"],
                             capture_output=True, text=True)
    assert blocked.returncode == 2, blocked.stdout
    assert "owns objects or holds privileges in other databases" in blocked.stderr
    assert "DROP OWNED BY pgvpn_peer3" in blocked.stderr, blocked.stderr
    subprocess.run(["psql", "-X", "-q", "-d", leftover, "-c", "DROP TABLE removal_elsewhere"],
                   check=True)
    subprocess.run([*PGVPN, "db", "remove", "--dsn", lab.dsn(), "peer3"], check=True,
                   capture_output=True)
    assert lab.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'pgvpn_peer3'") == "0"
    assert lab.psql("SELECT to_regclass('public.removal_leftover') IS NULL") == "t"

    # A peer revoked before its removal stays revoked when its name is registered again.
    subprocess.run([*PGVPN, "db", "revoke", "--dsn", lab.dsn(), "--peer", "peer2"], check=True,
                   capture_output=True)
    subprocess.run([*PGVPN, "db", "remove", "--dsn", lab.dsn(), "peer2"], check=True,
                   capture_output=True)
    lab.psql("SELECT pgvpn.register_peers(ARRAY['peer1', 'peer2', 'peer3'])")
    state = lab.psql("SELECT name, revoked_at IS NOT NULL, removed_at IS NOT NULL FROM pgvpn.peer "
                     "ORDER BY name")
    assert state.splitlines() == ["peer1|f|f", "peer2|t|t", "peer3|f|f"], state
    assert lab.psql(f"SELECT count(*) FROM pgvpn.link WHERE {ids['peer2']} IN (src, dst)") == "0"
    assert lab.psql("SELECT count(*) FROM pgvpn.link") == "2"


def _login(lab: Lab, user: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(lab.dsn(user), autocommit=True)
    wire.register(conn)
    return conn


def _refused(conn: psycopg.Connection[Any], query: str, params: Any = None) -> str:
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        return exc.sqlstate or ""
    return "allowed"


def _links(lab: Lab, query: str) -> dict[tuple[int, int], int]:
    rows = (r.split("|") for r in lab.psql(query).splitlines())
    return {(int(a), int(b)): int(n) for a, b, n in rows}


def _contains(path: Path, text: str) -> None:
    log = path.read_text(errors="replace")
    assert text in log, f"{path} does not say {text!r}:\n{log}"


def _assert(ok: bool) -> None:
    assert ok


def test_a_batch_committed_unheard_is_not_sent_again_when_a_peer_joined_meanwhile(make_lab):
    """peer1's batch holds a packet for peer2 (in its config, not registered: no route), then
    one for peer3. It commits, but peer1 never hears back: its session ends while the commit
    waits for a synchronous standby that is not there. The operator registers peer2 before
    peer1 reconnects. The reconnect must judge the batch by the links it wrote (peer3's), not
    by the first packet's peer, whose new link stands at 0, and must not log peer3's packet
    a second time under a new number."""
    lab = make_lab(peers=3, agents=False)
    p1, p2, p3 = lab.peers
    lab.psql("SELECT pgvpn.remove_peer('peer2')")  # not registered, until below
    for peer in (p1, p3):
        lab.start_agent(peer)
    eventually(lambda: _assert(lab.ping(p1, p3) and lab.ping(p3, p1)), timeout=30)
    out = Stream(lab, p1, p3, port=7111)     # the batch's logged packet
    back = Stream(lab, p3, p1, port=7112)    # the other way, throughout
    joining = Stream(lab, p1, p2, port=7113)  # the batch's first packet, to the newcomer
    for n in range(1, 11):
        assert out.send(n) and back.send(n)
    out.wait_count(10, timeout=10)
    back.wait_count(10, timeout=10)
    assert out.received == back.received == list(range(1, 11))

    ids = dict(r.split("|") for r in lab.psql("SELECT name, id FROM pgvpn.peer").splitlines())
    link = f"src_peer = {ids['peer1']} AND dst_peer = {ids['peer3']} AND dst_port = 7111"
    sender = "application_name = 'pgvpn-peer1-tx'"
    # Every cursor saved first: a receiver's save during the stall would hold a cursor row
    # that peer1's batch carries (the batch would wait on that lock, not at its commit).
    eventually(lambda: _assert(lab.psql(
        "SELECT bool_and(c.rx_seq = l.tx_seq) FROM pgvpn.cursor c JOIN pgvpn.link l "
        f"USING (src, dst) WHERE {ids['peer2']} NOT IN (src, dst)") == "t"))
    lab.psql("CREATE TABLE sync_probe ()")
    _stop(p1.pid)
    try:
        # Queued in peer1's TUN while its agent is stopped: one batch, peer2's packet first.
        assert joining.send(1) and out.send(11)
        sync_standbys(lab, "pgvpn_nobody")
        eventually(lambda: _assert(_commits_wait(lab)))
        os.kill(p1.pid, signal.SIGCONT)
        eventually(lambda: _assert(lab.psql(
            f"SELECT wait_event FROM pg_stat_activity WHERE {sender}") == "SyncRep"))
        _stop(p1.pid)  # no reconnect before the operator is done
        assert lab.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        f"WHERE {sender}") == "t"
        with psycopg.connect(lab.dsn(), autocommit=True) as operator:
            operator.execute("SET synchronous_commit = local")  # no standby to wait for
            operator.execute("SELECT pgvpn.register_peers(ARRAY['peer1', 'peer2', 'peer3'])")
        # The batch did commit, and peer2's new link stands at 0: judged by its first
        # packet's link, the batch looks lost.
        assert lab.psql(f"SELECT count(*) FROM pgvpn.packet WHERE {link}") == "11"
        assert lab.psql(f"SELECT tx_seq FROM pgvpn.link WHERE src = {ids['peer1']} "
                        f"AND dst = {ids['peer2']}") == "0"
        sync_standbys(lab, None)
        assert back.send(11)  # the other way, to the stopped agent
    finally:
        sync_standbys(lab, None)
        os.kill(p1.pid, signal.SIGCONT)
    resumed = time.monotonic()
    assert out.send(12)
    # Recovery: the stopped agent's reconnect, then its first datagram each way.
    assert out.wait_for(12, timeout=15) and back.wait_for(11, timeout=15)
    recovery = max(out.times[out.received.index(12)], back.times[back.received.index(11)])
    for n in range(13, 31):
        assert out.send(n) and back.send(n - 1)
        time.sleep(0.01)
    assert back.send(30)
    eventually(lambda: _assert(len(out.received) >= 30 and len(back.received) >= 30))
    time.sleep(1.0)  # a packet logged twice would have arrived by now
    assert out.received == list(range(1, 31)), out.received
    assert back.received == list(range(1, 31)), back.received
    assert lab.psql(f"SELECT count(*) FROM pgvpn.packet WHERE {link}") == "30"
    assert lab.agent_metrics(p1)['pgvpn_db_reconnects_total{direction="tx"}'] == 1
    _contains(Path(p1.log), "the batch in flight at the disconnect was committed")
    print(f"\nrecovery: {recovery - resumed:.2f} s from the agent resumed to a datagram each way")
    for stream in (out, back, joining):
        stream.close()


def _commits_wait(lab: Lab) -> bool:
    """Whether a commit now waits for the synchronous standby (the server takes up a reload a
    moment later): a probe's commit still waiting after 0.2 s, then cancelled (it stays
    committed here)."""
    failures: list[BaseException] = []
    with psycopg.connect(lab.dsn(), autocommit=True) as probe:
        def insert() -> None:
            try:
                probe.execute("INSERT INTO sync_probe DEFAULT VALUES")  # a commit with WAL
            except BaseException as exc:  # re-raised by the test's thread
                failures.append(exc)

        thread = threading.Thread(target=insert)
        thread.start()
        thread.join(0.2)
        waits = thread.is_alive()
        if waits:
            probe.cancel()
        thread.join(10)
    if failures:
        raise failures[0]
    return waits


def _stop(pid: int) -> None:
    """SIGSTOP, returning once every thread of the process has stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
              not in ("T", "t") for t in os.listdir(f"/proc/{pid}/task")):
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.005)
