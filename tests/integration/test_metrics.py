"""A real Prometheus scrapes real agents while traffic flows; every dashboard and alert query
must then be valid and return series.

Alert expressions are conditions: they return series only while the alert fires. Each one is
evaluated twice: whole (it must be valid PromQL) and as what it measures, the operands of its
top-level and/or/unless with the threshold comparison cut off (tests/monitoring.py `measured`),
which must return series — otherwise the alert could never fire.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgvpn_agent import status
from pgvpn_agent.lab import HOUSEKEEPING_ROLE, Lab
from tests.integration.standby import Standby
from tests.integration.stream import eventually
from tests.monitoring import RULES, alert_rules, dashboard_queries, measured

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            data = json.loads(get(f"{self.url}/api/v1/{path}?{query}"))
        except urllib.error.HTTPError as exc:  # 400/422: the expression is invalid
            data = json.loads(exc.read().decode())
        assert data["status"] == "success", (params, data.get("error"))
        return data["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])


def terminate(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Database:
    """The lab's cluster with a synchronous standby, each node with its exporter and its
    housekeeping, as the Ansible role runs them on every database host (docs/ha.md)."""
    lab: Lab
    exporters: dict[str, str]  # instance -> host:port
    housekeeping: dict[str, str]


@pytest.fixture
def database_exporter(make_lab: Any) -> Iterator[Database]:
    lab: Lab = make_lab(peers=2)
    standby = Standby(lab)
    standby.create()
    # every housekeeping job, as the database host runs them (free_space measures the disk)
    lab.start_housekeeping(on_disk_full="drop_oldest", min_free="1MB")
    ports = [free_port() for _ in range(3)]
    procs = [subprocess.Popen([sys.executable, "-m", "pgvpn_agent", "db", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for args in (["metrics", "--dsn", lab.dsn(), "--port", str(ports[0])],
                          ["metrics", "--dsn", standby.dsn(), "--port", str(ports[1])],
                          ["housekeeping", "--dsn", standby.dsn(HOUSEKEEPING_ROLE),
                           "--on-disk-full", "drop_oldest", "--min-free", "1MB",
                           "--metrics-port", str(ports[2])])]
    try:
        yield Database(lab, {"db1": f"127.0.0.1:{ports[0]}", "db2": f"127.0.0.1:{ports[1]}"},
                       {"db1": f"127.0.0.1:{lab.housekeeping_port}",
                        "db2": f"127.0.0.1:{ports[2]}"})
    finally:
        for proc in procs:
            terminate(proc)
        standby.stop()


@pytest.fixture
def prometheus(database_exporter: Database, tmp_path: Path) -> Iterator[Prometheus]:
    """/usr/bin/prometheus scraping every agent of the lab and both database nodes' exporter
    and housekeeping each second, with pgvpn's alert rules loaded, as the pgvpn_monitoring role
    configures it."""
    lab = database_exporter.lab
    agents = [{"targets": [urllib.parse.urlsplit(p.metrics_url).netloc],
               "labels": {"instance": p.name}} for p in lab.peers]

    def nodes(targets: dict[str, str]) -> list[dict[str, Any]]:
        return [{"targets": [t], "labels": {"instance": i}} for i, t in targets.items()]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "pgvpn_agent", "static_configs": agents},
            {"job_name": "pgvpn_database",
             "static_configs": nodes(database_exporter.exporters)},
            {"job_name": "pgvpn_housekeeping",
             "static_configs": nodes(database_exporter.housekeeping)},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))  # noqa: SIM115
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        eventually(lambda: _assert_ready(prom), timeout=30)
        yield prom
    finally:
        terminate(proc)


def _assert_ready(prom: Prometheus) -> None:
    try:
        get(f"{prom.url}/-/ready")
    except OSError as exc:
        raise AssertionError(f"Prometheus not ready: {exc}") from None


def test_every_dashboard_and_alert_query_returns_series(database_exporter, prometheus):
    lab = database_exporter.lab
    a, b = lab.peers
    eventually(lambda: _assert_targets_up(prometheus, 6), timeout=20)
    # Traffic both ways, and packets to an address no peer owns (dropped: no_route).
    lab.iperf(a, b, seconds=2)
    assert lab.ping(b, a, count=5)
    lab.exec(a, ["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.77.0.99"])
    time.sleep(3)  # a few more scrapes, so every rate window holds the traffic

    empty = []
    for title, expr in dashboard_queries():
        if not prometheus.query(expr):
            empty.append(f"dashboard {title}: {expr}")
    eventually(lambda: _assert_rules_evaluated(prometheus), timeout=10)
    for rule in alert_rules():
        prometheus.query(rule["expr"])  # valid, whether or not it fires
        for expr in measured(rule["expr"]):
            if not prometheus.query(expr):
                empty.append(f"alert {rule['alert']}: {expr}")
    assert not empty, "queries without series:\n" + "\n".join(empty)

    # And the numbers are the traffic's.
    tx = prometheus.value(f'sum(increase(pgvpn_bytes_total{{instance="{a.name}",'
                          'direction="tx"}[1m]))')
    assert tx > 1e5
    assert prometheus.value('sum(pgvpn_packets_dropped_total{reason="no_route"})') >= 3
    p50 = prometheus.value('histogram_quantile(0.5, sum by (le) (rate('
                           'pgvpn_delivery_latency_seconds_bucket[1m])))')
    assert 0 < p50 < 1
    assert prometheus.value("sum(pgvpn_log_partition_rows)") > 0
    # The nodes' roles as the replication row shows them; only the primary's housekeeping works.
    assert prometheus.value('pgvpn_database_in_recovery{instance="db2"}') == 1
    assert prometheus.value('pgvpn_database_in_recovery{instance="db1"}') == 0
    assert prometheus.value("pgvpn_replication_synchronous_standbys") == 1
    assert prometheus.value('pgvpn_housekeeping_active{instance="db1"}') == 1
    assert prometheus.value('pgvpn_housekeeping_active{instance="db2"}') == 0
    # A healthy lab raises no alert, not even a pending one; the disk alerts watch this host's
    # disk, which is not the lab's to keep free.
    assert not prometheus.query('ALERTS{alertname!~"PgvpnLogDisk.*"}')


def _assert_targets_up(prom: Prometheus, n: int) -> None:
    targets = prom.api("targets")["activeTargets"]
    up = [t for t in targets if t["health"] == "up"]
    assert len(targets) == n and len(up) == n, [(t["scrapeUrl"], t["lastError"])
                                                for t in targets]


def _assert_rules_evaluated(prom: Prometheus) -> None:
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == len(alert_rules())
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad


def test_exposition_passes_promtool_and_status_reads_it(make_lab):
    lab = make_lab(peers=2)
    a, b = lab.peers
    assert lab.ping(a, b, count=3)
    for peer in lab.peers:
        text = get(peer.metrics_url)
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                               text=True)
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

    out = subprocess.run([sys.executable, "-m", "pgvpn_agent", "status", "--json", "--url",
                          a.metrics_url, "--interval", "0.5"], capture_output=True, text=True,
                         check=True)
    report = json.loads(out.stdout)
    assert report["peer"] == a.name and report["mode"] == "logged"
    assert report["database"]["tx"]["up"] and report["database"]["rx"]["up"]
    (peer,) = report["peers"]
    assert peer["name"] == b.name
    assert peer["tx_packets"] >= 3 and peer["rx_packets"] >= 3
    assert peer["last_tx_seconds_ago"] is not None and peer["lag_packets"] is not None
    text = status.run(status.url_from_config(Path(a.config)), interval=0)
    assert f"agent: {a.name}" in text and f"peer: {b.name}" in text
    assert not math.isnan(report["uptime_seconds"])
