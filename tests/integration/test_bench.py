"""`pgvpn bench` end to end, on a short run: every output is written and readable.

No speed thresholds: this machine is shared, and the benchmark's job is to measure, not to judge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openvpn") is None and not os.environ.get("CI"),
                       reason="the OpenVPN baseline needs `openvpn` (run scripts/bootstrap)"),
]

VARIANTS = ["seed-v2", "logged", "openvpn-aes", "veth"]


def test_quick_bench_writes_table_json_and_chart(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pgvpn_agent", "bench", "--quick", "--seconds", "1",
         "--only", *VARIANTS, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md, js, png = (sorted(tmp_path.glob(f"tunnel-*.{ext}")) for ext in ("md", "json", "png"))
    assert len(md) == len(js) == len(png) == 1, list(tmp_path.iterdir())

    report = json.loads(js[0].read_text())
    assert [r["variant"]["key"] for r in report["results"]] == VARIANTS
    for result in report["results"]:
        (sample,) = result["samples"]
        assert sample["mbits"] > 0 and sample["payload_bytes"] > 0, result
        if result["variant"]["kind"] == "pgvpn":
            assert sample["rows"] > 0 and sample["log_bytes_per_byte"] > 0, result
            assert sample["postgres_cpu_s_per_mb"] > 0 and sample["peak_rss_mb"] > 0, result
        if result["variant"]["kind"] != "veth":
            assert sample["tunnel_cpu_s_per_mb"] > 0, result

    table = md[0].read_text()
    for result in report["results"]:
        assert f"| {result['variant']['name']} |" in table
    assert png[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert str(png[0]) in proc.stderr, "the output paths are printed at the end"


def test_short_soak_writes_table_json_and_chart(tmp_path):
    """`pgvpn bench soak`: the database sampled under a steady stream, a peer's transaction
    ended by the watchdog, a held snapshot and its release."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgvpn_agent", "bench", "soak", "--minutes", "0.4", "--hold",
         "0.1", "--max-transaction", "2", "--interval", "2", "--closed-day-rows", "2000",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md, js, png = (sorted(tmp_path.glob(f"soak-*.{ext}")) for ext in ("md", "json", "png"))
    assert len(md) == len(js) == len(png) == 1, list(tmp_path.iterdir())
    report = json.loads(js[0].read_text())
    assert {"steady", "peer", "hold", "release"} <= {s["phase"] for s in report["samples"]}
    assert report["peer_held_s"] is not None
    assert report["rates"]["xids_per_s"] > 0 and report["rates"]["wal_bytes_per_s"] > 0
    assert report["hot_rows"]["link"]["updates_per_s"] > 0
    assert sorted(e["event"] for e in report["events"]) == [
        "peer opens a transaction", "snapshot held (pg_dump)", "snapshot released",
        "watchdog ended it"]
    assert "| transaction ids |" in md[0].read_text()
    assert png[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
