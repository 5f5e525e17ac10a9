"""`pgvpn bench` end to end, on a short run: every output is written and readable.

No speed thresholds: this machine is shared, and the benchmark's job is to measure, not to judge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from bench import tunnel

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openvpn") is None and not os.environ.get("CI"),
                       reason="the OpenVPN baseline needs `openvpn` (run scripts/bootstrap)"),
]

# Every variant (this is also CI's smoke run of the bench), seed-go first: the ratios' baseline.
VARIANTS = [v.key for v in tunnel.VARIANTS]
DURABILITY = {"synchronous_commit", "fsync", "full_page_writes", "wal_sync_method"}


def test_quick_bench_writes_table_json_and_chart(tmp_path):
    """Every variant, including `seed-go`: the seed's Go program builds (from Debian's
    packages, installed if missing), carries the traffic, logs its rows, and becomes the
    ratios' baseline."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgvpn_agent", "bench", "--quick", "--seconds", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md, js, png = (sorted(tmp_path.glob(f"tunnel-*.{ext}")) for ext in ("md", "json", "png"))
    assert len(md) == len(js) == len(png) == 1, list(tmp_path.iterdir())

    report = json.loads(js[0].read_text())
    assert [r["variant"]["key"] for r in report["results"]] == VARIANTS
    assert report["seed"] == "seed-go" and report["results"][0]["x_seed"] == 1.0
    for result in report["results"]:
        (sample,) = result["samples"]
        assert sample["mbits"] > 0 and sample["payload_bytes"] > 0, result
        assert sample["rtt_idle_p50_ms"] <= sample["rtt_idle_p99_ms"], result
        assert sample["rtt_load_p50_ms"] <= sample["rtt_load_p99_ms"], result
        if result["variant"]["kind"] in ("pgvpn", "seed-go"):
            logs = result["variant"].get("mode") != "payload"  # the cheat logs nothing
            assert (sample["rows"] > 0) == logs, result
            assert sample["log_bytes_per_byte"] > 0 or not logs, result
            assert sample["postgres_cpu_s_per_mb"] > 0 and sample["peak_rss_mb"] > 0, result
            assert set(sample["durability"]) == DURABILITY, result
            assert sample["durability"]["synchronous_commit"] == "on", result
        if result["variant"]["kind"] != "veth":
            assert sample["tunnel_cpu_s_per_mb"] > 0, result

    table = md[0].read_text()
    for result in report["results"]:
        assert f"| {result['variant']['name']} |" in table
    assert "| x seed-go |" in table and "- PostgreSQL durability (every logged sample): " \
        "fsync = on, full_page_writes = on, synchronous_commit = on, wal_sync_method = " in table
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


def test_short_mesh_writes_table_json_and_chart(tmp_path):
    """`pgvpn bench mesh`: the references (OpenVPN's for the floor) and a 4-peer mesh side by
    side, every pgvpn window sampled (CPU by process group, commits, wake-ups, waits) on its
    own lab, the targets as ratios."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgvpn_agent", "bench", "mesh", "--peers", "4", "--seconds", "1",
         "--idle", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md, js, png = (sorted(tmp_path.glob(f"mesh-*.{ext}")) for ext in ("md", "json", "png"))
    assert len(md) == len(js) == len(png) == 1, list(tmp_path.iterdir())
    report = json.loads(js[0].read_text())
    by_phase = {s["phase"]: s for s in report["samples"]}
    assert list(by_phase) == ["one-flow", "eight-flows", "bidir", "openvpn-aes", "idle",
                              "mesh-one-pair", "mesh", "mesh-bidir"]
    assert by_phase.pop("openvpn-aes")["pairs"][0]["mbits"] > 0
    assert len(by_phase["mesh"]["pairs"]) == len(by_phase["mesh-bidir"]["pairs"]) == 2
    assert all(p["mbits_reverse"] is not None for p in by_phase["mesh-bidir"]["pairs"])
    for phase, sample in by_phase.items():
        usage = sample["usage"]
        assert usage["cpu_s"]["agents"] >= 0 and usage["seconds"] > 0, phase
        assert usage["backends"]["backends tx"] == usage["backends"]["backends rx"] \
            == sample["peers"], phase
        if phase == "idle":
            assert sample["rtt_idle_ms"] and not sample["pairs"]
            assert usage["memory_mb"]["agents RSS"] > 0
            assert usage["memory_mb"]["backends rx PSS"] > 0
        else:
            assert all(p["mbits"] > 0 for p in sample["pairs"]), phase
            assert usage["cpu_s"]["agents"] > 0 and usage["cpu_s"]["backends tx"] > 0, phase
            assert usage["counters"]["commits"] > 0 and usage["counters"]["wal_syncs"] > 0
            assert usage["counters"]["batches"] > 0 and usage["waits"]["backends tx"]
    assert report["free_page_reporting"]  # what long windows measure besides pgvpn
    assert [t["needed"] for t in report["targets"]] == [0.8, 0.5, 1.0, 1.0, 0.4, 0.9]
    assert all(t["measured"] is not None for t in report["targets"])
    table = md[0].read_text()
    assert "| mesh aggregate ≥ 0.8x one pair (2-peer lab) |" in table
    assert "| idle, 4 peers | per peer | total |" in table
    assert png[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert str(png[0]) in proc.stderr, "the output paths are printed at the end"


def test_long_mesh_crosses_midnight_and_a_checkpoint_beside_a_synchronous_standby(tmp_path):
    """`pgvpn bench mesh-long`: the database's clock (libfaketime) passes midnight inside the
    run, so rows land in two days' partitions; the CHECKPOINT and the closed day's indexes run
    while the pairs carry traffic; every commit also waited for a synchronous standby. The
    first pair's reference window is 3 s (60 by default): the report's ratio, not its length."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgvpn_agent", "bench", "mesh-long", "--peers", "4", "--seconds",
         "16", "--segment", "4", "--checkpoint-at", "0.2", "--rollover-at", "0.4",
         "--index-after", "3", "--reference", "3", "--standby", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md, js, png = (sorted(tmp_path.glob(f"mesh-long-*.{ext}")) for ext in ("md", "json", "png"))
    assert len(md) == len(js) == len(png) == 1, list(tmp_path.iterdir())
    report = json.loads(js[0].read_text())
    assert report["meta"]["standby"] and report["meta"]["replication"] == "sync"
    events = {e["name"]: e for e in report["events"]}
    assert set(events) == {"CHECKPOINT", "midnight (database clock)", "closed-day indexes"}
    assert 4.0 < events["midnight (database clock)"]["at"] < 10.0, events
    assert events["CHECKPOINT"]["seconds"] > 0 and report["meta"]["checkpoints_requested"] >= 1
    days = sorted(report["rows_by_day"])
    assert len(days) == 2 and all(report["rows_by_day"][d] > 100 for d in days), days
    assert len(report["pairs"]) == 2
    assert all(len(p["per_second"]) >= 15 and p["mbits"] > 0 for p in report["pairs"])
    assert len(report["aggregate_per_second"]) >= 15
    assert report["segments"][0]["start"] < 1 and len(report["segments"]) >= 4
    assert all(s["usage"]["counters"]["batches"] > 0 for s in report["segments"][:-1])
    assert "| midnight (database clock) |" in md[0].read_text()
    assert "| the first pair alone before the run, same lab: Mbit/s; " in md[0].read_text()
    assert png[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_rtt_cuts_idle_pings_into_stages_beside_the_floor(tmp_path):
    """`pgvpn bench rtt`: the seed's Go program and both pgvpn variants, every captured pgvpn
    round trip cut into stages that add up to it, the floor measured on the same PostgreSQL."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgvpn_agent", "bench", "rtt", "--reps", "1", "--pings", "8",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md, js, png = (sorted(tmp_path.glob(f"rtt-*.{ext}")) for ext in ("md", "json", "png"))
    assert len(md) == len(js) == len(png) == 1, list(tmp_path.iterdir())
    report = json.loads(js[0].read_text())
    assert [r["key"] for r in report["runs"]] == ["seed-go", "logged", "logged-boxed",
                                                  "logged-sealed"]
    for run in report["runs"]:
        assert len(run["ping_ms"]) == len(run["ping_warm_ms"]) == 8, run["key"]
        floor = run["floor_ms"]
        assert floor["commit"] > 0 and 0 < floor["carried"] < floor["logged"]
        assert run["fsync"]["us"] > 0 and run["fsync"]["method"] == "fdatasync"
        assert run["fsync"]["warm_us"] > 0 and run["fsync"]["paused_us"] > 0, run["fsync"]
        if run["key"] == "seed-go":
            assert run["trips"] == [], "the seed's program: its ping, no stages"
            continue
        assert len(run["trips"]) >= 6, f"{run['key']}: most pings cut into stages"
        for trip in run["trips"]:
            parts = sum(v for k, v in trip.items() if k != "total")
            assert parts == pytest.approx(trip["total"], abs=1e-6)
            assert all(v >= 0 for v in trip.values()), trip
        fetched = [t for t in run["trips"] if t["out.fetch"] > 0]
        if run["sealed"] or run["boxed"]:  # a ping rides in its notification
            assert len(fetched) <= 1, run["trips"]
        else:
            assert len(fetched) == len(run["trips"])
    table = md[0].read_text()
    assert "| floor: a WAL flush (pg_test_fsync, one 8 kB write), ms |" in table
    assert "| back-to-back ping p50 / p99 ms (`ping -A`) |" in table
    assert re.search(r"\| idle floor: two flushes after a pause \(an idle round trip commits "
                     r"twice\), ms( \| \d+\.\d\d){4} \|", table), table
    assert "| back-to-back ping / floor (logged: the seed's way; sealed, boxed: carried) |" in table
    assert png[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_pagecache_probe_compares_new_cached_and_freed_pages(tmp_path):
    """`pgvpn bench pagecache`: the three phases sampled, the machine's free page reporting
    named, the file it wrote gone."""
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pgvpn_agent", "bench", "pagecache", "--gb", "0.25", "--again",
         "0.125", "--step", "32", "--rate", "0", "--dir", str(work), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md, js, png = (sorted(tmp_path.glob(f"pagecache-*.{ext}")) for ext in ("md", "json", "png"))
    assert len(md) == len(js) == len(png) == 1, list(tmp_path.iterdir())
    report = json.loads(js[0].read_text())
    phases = [s["phase"] for s in report["steps"]]
    assert phases == ["new file"] * 8 + ["cached pages"] * 4 + ["memory freed a moment ago"] * 4
    assert all(s["us_per_page"] >= 0 and s["free_mb"] > 0 for s in report["steps"])
    assert report["meta"]["free_page_reporting"]
    assert "| the same file again (cached pages) |" in md[0].read_text()
    assert png[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert list(work.iterdir()) == []


def test_pagecache_probe_refuses_a_directory_without_room(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pgvpn_agent", "bench", "pagecache", "--gb", "100000", "--dir",
         str(tmp_path), "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "GB free" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_overlap_compares_one_connection_with_two():
    """`python -m bench.overlap`: each round logs every batch both ways (a failed send or
    reader fails the run) and prints its ratio, then the table."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.overlap", "--rounds", "2", "--batches", "20",
         "--db-memory", "0", "--port", str(57000 + os.getpid() % 400)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and "(one first)" in rounds[0] and "(two first)" in rounds[1]
    assert "| two / one per round |" in proc.stdout and "geometric mean" in proc.stdout


def test_insert_cost_measures_every_index_variant():
    """`python -m bench.insert_cost`: send_batch() accepts its batches (a row whose length does
    not describe its payload is refused) and each index variant prints its cost per row."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.insert_cost", "--prefill", "1000", "--rounds", "1",
         "--port", str(57400 + os.getpid() % 400)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^(none|dst_port|both ports|ports \+ addresses) +[\d.]+ us/row",
                      proc.stdout, re.MULTILINE)
    assert rows == ["none", "dst_port", "both ports", "ports + addresses"], proc.stdout
