"""The dashboard, its provisioning and the alert rules, checked without a running Prometheus
(tests/integration/test_metrics.py evaluates every query against live agents)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import REGISTRY

from pgvpn_agent import metrics
from tests.monitoring import (
    DASHBOARD,
    ROOT,
    RULE_TESTS,
    RULES,
    alert_rules,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    measured,
)

PROVISIONING = ROOT / "monitoring" / "grafana" / "provisioning"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(apt-get install prometheus)")


def test_dashboard_panels_use_the_provisioned_datasource():
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "pgvpn.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert "${DS_" not in DASHBOARD.read_text(), "provisioning cannot fill import-time inputs"
    assert "__inputs" not in dashboard()
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip(), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_dashboard_provider_loads_the_dashboard_directory():
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "pgvpn.yml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"].endswith("/pgvpn")


def test_dashboard_covers_every_agent_metric():
    """A metric nobody graphs or alerts on is a metric nobody reads."""
    queries = [e for _, e in dashboard_queries()] + [r["expr"] for r in alert_rules()]
    queries += [v["definition"] for v in dashboard()["templating"]["list"]]
    used = set(re.findall(r"pgvpn_[a-z_]+", " ".join(queries)))
    defined = {m.name for m in REGISTRY.collect() if m.name.startswith("pgvpn_")}
    assert metrics.DELIVERY_SECONDS.name in defined and len(defined) > 15
    missing = {name for name in defined if not any(u.startswith(name) for u in used)}
    assert missing == {"pgvpn_agent_info"}


def test_every_dashboard_variable_has_a_substitute():
    assert dashboard_queries()  # raises KeyError on an unknown $variable


@pytest.mark.parametrize(("expr", "operands"), [
    ('up{job="a"} == 0', ['up{job="a"}']),
    ('sum by (x) (rate(m{r!="no_route"}[5m])) > 1', ['sum by (x) (rate(m{r!="no_route"}[5m]))']),
    ("a / b < 0.1 and predict_linear(c[1h], 4 * 3600) < 0",
     ["a / b", "predict_linear(c[1h], 4 * 3600)"]),
    ('up{job="db"} == 0 or db_up == 0', ['up{job="db"}', "db_up"]),
    ('m{l=">"} > 2', ['m{l=">"}']),
    ("max(x)", ["max(x)"]),
    ('max(s) < 1 and on () count(up{job="db"}) > 1', ["max(s)", 'count(up{job="db"})']),
])
def test_measured_cuts_the_threshold(expr, operands):
    assert measured(expr) == operands


def test_alerts_have_severity_and_text():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


@needs_promtool
def test_promtool_accepts_the_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_alerts_fire_when_they_should():
    out = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_role_provisions_what_the_dashboard_expects():
    role = ROOT / "roles" / "pgvpn_monitoring"
    role_vars = yaml.safe_load((role / "vars" / "main.yml").read_text())
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "pgvpn.yml").read_text())
    assert role_vars["_pgvpn_monitoring_grafana_datasource_uid"] == "pgvpn-prometheus"
    assert "uid: {{ _pgvpn_monitoring_grafana_datasource_uid }}" in (
        role / "templates" / "grafana-datasource.yml.j2").read_text()
    assert (role_vars["_pgvpn_monitoring_grafana_dashboards_dir"]
            == provider["providers"][0]["options"]["path"])
    template = (role / "templates" / "prometheus.yml.j2").read_text()
    for rule in alert_rules():
        for job in re.findall(r'job="(\w+)"', rule["expr"]):
            # a job of its own, or one of the database hosts' jobs (a loop over them)
            assert f"job_name: {job}" in template or f"('{job}', " in template, (rule["alert"],
                                                                               job)
