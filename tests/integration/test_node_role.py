"""The database host's own services follow the primary: with Patroni every node runs the
exporter and housekeeping, and a promotion must move the work without anyone touching them.

A real streaming standby of the lab's cluster; an exporter and a housekeeping instance on each
node, as the Ansible role runs them (their dsn names their own node only). On the standby the
exporter reports the node's role and stream, housekeeping waits without a single failed job;
after the primary dies and the standby is promoted, the standby's housekeeping runs its jobs
within seconds and its exporter reports the new role and timeline.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pgvpn_agent import labhost
from pgvpn_agent.lab import HOUSEKEEPING_ROLE
from tests.integration.standby import Standby
from tests.integration.stream import eventually
from tests.integration.test_metrics import free_port, terminate

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    return labhost.scrape(f"http://127.0.0.1:{port}/metrics", f"port {port}")


@contextmanager
def service(args: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "pgvpn_agent", "db", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        eventually(lambda: _answers(proc, port), timeout=30)
        yield proc
    finally:
        terminate(proc)
        # its log must show no traceback: the standby's instance is quiet, not failing
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert "Traceback" not in stderr, stderr


def _answers(proc: subprocess.Popen[bytes], port: int) -> None:
    assert proc.poll() is None, f"exited with {proc.returncode}"
    try:
        scrape(port)
    except labhost.LabError as exc:
        raise AssertionError(str(exc)) from None


def test_exporter_and_housekeeping_follow_the_primary(make_lab):
    lab = make_lab(peers=2, agents=False)
    standby = Standby(lab)
    ports = {name: free_port() for name in ("metrics1", "metrics2", "hk2")}
    try:
        standby.create()
        lab.start_housekeeping()
        with (service(["metrics", "--dsn", lab.dsn(), "--port", str(ports["metrics1"])],
                      ports["metrics1"]),
              service(["metrics", "--dsn", standby.dsn(), "--port", str(ports["metrics2"])],
                      ports["metrics2"]),
              service(["housekeeping", "--dsn", standby.dsn(HOUSEKEEPING_ROLE),
                       "--metrics-port", str(ports["hk2"])], ports["hk2"])):
            primary, replica = scrape(ports["metrics1"]), scrape(ports["metrics2"])
            assert primary["pgvpn_database_in_recovery"] == 0
            assert primary["pgvpn_database_timeline"] == 1
            assert primary["pgvpn_replication_synchronous_standbys"] == 1
            info = [k for k in primary if k.startswith("pgvpn_replication_standby_info{")]
            assert len(info) == 1 and 'sync_state="sync"' in info[0] \
                and 'state="streaming"' in info[0], info
            assert any(k.startswith("pgvpn_replication_lag_bytes{") for k in primary), primary
            assert replica["pgvpn_database_in_recovery"] == 1
            assert replica["pgvpn_database_timeline"] == 1
            assert replica["pgvpn_replication_receiving"] == 1
            assert "pgvpn_replication_synchronous_standbys" not in replica
            assert lab.housekeeping_metrics()["pgvpn_housekeeping_active"] == 1

            time.sleep(2.5)  # a few of its checks: the standby's housekeeping stays idle
            idle = scrape(ports["hk2"])
            assert idle["pgvpn_housekeeping_active"] == 0
            runs = {k: v for k, v in idle.items() if k.startswith("pgvpn_housekeeping_runs_total")
                    and v}
            # only the read-only limits, which measure the standby itself
            assert list(runs) == ['pgvpn_housekeeping_runs_total{job="limits",result="ok"}'], runs
            assert idle["pgvpn_wal_filesystem_size_bytes"] > 0

            failed = time.monotonic()
            lab.stop_postgres("immediate")
            standby.promote()
            lab.port = standby.port

            def took_over() -> None:
                m = scrape(ports["hk2"])
                assert m["pgvpn_housekeeping_active"] == 1
                assert m['pgvpn_housekeeping_runs_total{job="partitions",result="ok"}'] >= 1, m
            eventually(took_over, timeout=15)
            taken = time.monotonic() - failed
            print(f"\nhousekeeping on the promoted node ran its jobs {taken:.2f}s after the "
                  "primary died")
            assert taken < 5, f"took {taken:.1f}s"
            promoted = scrape(ports["metrics2"])
            assert promoted["pgvpn_database_in_recovery"] == 0
            assert promoted["pgvpn_database_timeline"] == 2
            assert promoted["pgvpn_replication_synchronous_standbys"] == 0
            assert scrape(ports["metrics1"])["pgvpn_database_up"] == 0
            failures = {k: v for k, v in scrape(ports["hk2"]).items()
                        if k.startswith("pgvpn_housekeeping_runs_total") and 'failed' in k}
            assert not any(failures.values()), failures
    finally:
        standby.stop()
