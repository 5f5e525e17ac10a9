"""`pgvpn bench mesh` judges by ratios within a run: one pair, 8 flows, both ways, a mesh."""

from __future__ import annotations

import pytest

from bench import meshreport
from bench.mesh import PairRun, Sample
from bench.probe import Usage, role_of, wait_of


def sample(phase: str, *flows: float, reverse: tuple[float, ...] = ()) -> Sample:
    pairs = [PairRun(f"peer{2 * i + 1}", f"peer{2 * i + 2}", f,
                     reverse[i] if reverse else None, 5.0) for i, f in enumerate(flows)]
    usage = Usage(seconds=2.0, cpu_s={"agents": 1.0, "backends tx": 0.5},
                  counters={"commits": 100.0, "batches": 50.0, "wal_syncs": 25.0},
                  waits={"backends tx": {"running": 3, "Lock:object": 1}},
                  backends={"backends tx": 2, "backends rx": 2})
    return Sample(phase, 1, 2 * max(1, len(flows)), pairs, usage)


def test_targets_are_ratios_to_one_flow_in_the_same_run():
    samples = [sample("one-flow", 500), sample("eight-flows", 400),
               sample("bidir", 300, reverse=(100,)),
               sample("mesh", 100, 100, 50, 150, 100)]
    got = {t: v for t, v, _, _ in meshreport.targets(samples)}
    assert got["mesh aggregate ≥ 0.8x one pair (2-peer lab)"] == 1.0
    assert got["no mesh pair below half the fair share"] == 0.5
    assert got["8 parallel flows ≥ 1x one flow"] == 0.8
    assert got["--bidir sum ≥ one direction alone"] == 0.8
    assert got["--bidir: neither direction below 0.4x"] == 0.2
    assert got["floor: one pair ≥ 0.9x OpenVPN AES"] is None  # no reference, no verdict


def test_the_floor_is_one_flow_against_openvpn_in_the_same_run():
    samples = [sample("one-flow", 450), sample("openvpn-aes", 500)]
    floor = next(t for t in meshreport.targets(samples) if t[0].startswith("floor"))
    assert floor[1:3] == (0.9, 0.9)
    table = meshreport.markdown(samples, {"peers": 10, "seconds": 1, "reps": 1,
                                          "started": "now", "loadavg_before": 0.0})
    assert "| OpenVPN AES-256-GCM: 1 flow | **500.0**" in table
    assert "OpenVPN AES-256-GCM: 1 flow" not in table.split("CPU in cores")[1], \
        "no database, no agents: OpenVPN's window has no cost rows"


def test_a_missing_window_is_not_judged():
    samples = [sample("one-flow", 500)]
    met = {t: v for t, v, _, _ in meshreport.targets(samples)}
    assert met["8 parallel flows ≥ 1x one flow"] is None
    assert "| 8 parallel flows ≥ 1x one flow | - | 1.0x | - |" in meshreport.targets_table(samples)


def test_fairness_counts_each_direction():
    assert meshreport.fairness(sample("bidir", 300, reverse=(100,))) == 0.5
    assert meshreport.fairness(sample("one-flow", 500)) is None


def test_backends_and_waits_are_named_by_what_they_serve():
    assert role_of("pgvpn-peer3-tx", "client backend") == "backends tx"
    assert role_of("pgvpn-peer3-rx", "client backend") == "backends rx"
    assert role_of("pgvpn-housekeeping", "client backend") == "backends other"
    assert role_of("", "autovacuum worker") == "autovacuum"
    assert wait_of("active", None, None) == "running"
    assert wait_of("idle", "Client", "ClientRead") == "idle"
    assert wait_of("idle in transaction", "Client", "ClientRead") == \
        "in transaction, waiting for agent"
    assert wait_of("active", "Lock", "object") == "Lock:object"


@pytest.mark.parametrize("reporting, said", [("on, blocks of order 9 and up", True),
                                             ("off", False), ("no balloon device", False),
                                             (None, False)])
def test_the_header_names_a_host_that_takes_free_memory_back(reporting, said):
    meta = {"peers": 10, "seconds": 60, "reps": 1, "started": "now", "loadavg_before": 0.0,
            "free_page_reporting": reporting}
    header = meshreport.markdown([sample("one-flow", 450)], meta).split("\n\n")[0]
    assert ("reports free pages to its host (on, blocks of order 9" in header) == said
