"""The dashboard's and the alert rules' PromQL, extracted so that tests can evaluate all of it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "pgvpn.json"
RULES = ROOT / "monitoring" / "prometheus" / "rules" / "pgvpn.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "rules" / "pgvpn_test.yml"

# What Grafana would put in place of its variables for a Prometheus scraping every second:
# $__rate_interval is max(4 x scrape interval, $__interval + scrape interval).
GRAFANA_VARIABLES = {"__rate_interval": "10s", "__interval": "1s", "__range": "1m",
                     "instance": ".+"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_OPEN, _CLOSE = "([{", ")]}"
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPERATORS = re.compile(r"\s(and|or|unless)\s")
_MATCHING = re.compile(r"^\s*(on|ignoring)\s*\([^)]*\)")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # inside collapsed rows
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL with Grafana's variables substituted) for every target."""
    queries = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']} {target['refId']}",
                            substitute(target["expr"])))
    return queries


def substitute(expr: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"unknown Grafana variable ${name} in {expr}")
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def measured(expr: str) -> list[str]:
    """What a condition compares: each operand of a top-level and/or/unless, with a top-level
    comparison cut off (`a > 1 and b < 2` -> [a, b]).

    A condition that holds returns series only while its alert fires; what it measures must
    return series all the time, or the alert could never fire.
    """
    parts = []
    for part in _top_level_split(expr):
        part = _MATCHING.sub("", part, count=1)  # `and on () x`: the operand is x
        cut = _top_level_comparison(part)
        parts.append((part[:cut] if cut is not None else part).strip())
    return parts


def _depths(expr: str) -> list[int]:
    """Nesting depth at each character; quoted strings count as nested."""
    depths, depth, quote = [], 0, ""
    for ch in expr:
        if quote:
            depths.append(depth + 1)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'`":
            quote = ch
            depths.append(depth + 1)
            continue
        if ch in _OPEN:
            depth += 1
        depths.append(depth)
        if ch in _CLOSE:
            depth -= 1
    return depths


def _top_level_split(expr: str) -> list[str]:
    depths = _depths(expr)
    parts, start = [], 0
    for m in _SET_OPERATORS.finditer(expr):
        if depths[m.start()] == 0 and m.start() >= start:
            parts.append(expr[start:m.start()])
            start = m.end()
    parts.append(expr[start:])
    return parts


def _top_level_comparison(expr: str) -> int | None:
    depths = _depths(expr)
    i = 0
    while i < len(expr):
        if depths[i] == 0:
            for op in _COMPARISONS:
                if expr.startswith(op, i):
                    return i
        i += 1
    return None
