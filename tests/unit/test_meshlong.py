"""`pgvpn bench mesh-long`: the database's midnight placed in the run, each event's cost read
off the mesh's throughput per second."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from bench import meshlongreport
from bench.mesh import PairRun
from bench.meshlong import Event, LongRun, Segment, clock_offset, server_checkpoints
from bench.probe import Usage


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("now", "midnight_in", "offset"), [
    ("2026-12-04 06:00:00", 300, 18 * 3600 - 300),
    ("2026-12-04 23:50:00", 300, 300),
    ("2026-12-04 23:58:00", 300, 86400 - 180),  # midnight would come too soon: the next one
    ("2026-12-04 23:55:00", 300, 0),
])
def test_the_database_clock_moves_forward_to_meet_midnight_at_the_chosen_second(
        now, midnight_in, offset):
    got = clock_offset(epoch(now), midnight_in)
    assert got == pytest.approx(offset)
    assert 0 <= got < 86400
    assert (epoch(now) + midnight_in + got) % 86400 == pytest.approx(0)


def test_the_aggregate_sums_each_second_over_pairs_of_unequal_length():
    assert meshlongreport.aggregate([[1, 2, 3], [10, 20]]) == [11, 22, 3]
    assert meshlongreport.aggregate([]) == []


def test_an_event_costs_its_dip_and_the_time_to_recover():
    series = [100.0] * 10 + [20.0, 40.0, 80.0, 95.0] + [100.0] * 10
    im = meshlongreport.impact(series, 10.4)
    assert im.before == 100.0
    assert im.worst == 20.0
    assert im.after == pytest.approx((20 + 40 + 80 + 95 + 600) / 10)
    assert im.recovered_s == 3.0  # second 13 is the first back at 90 % of before


def test_an_event_never_recovered_from_or_at_the_start_says_so():
    never = meshlongreport.impact([100.0] * 5 + [10.0] * 5, 5)
    assert never.recovered_s is None and never.worst == 10.0
    first = meshlongreport.impact([50.0, 60.0], 0)
    assert first.before is None and first.recovered_s is None and first.worst == 50.0


def long_run() -> LongRun:
    usage = Usage(seconds=4.0, cpu_s={"agents": 2.0, "backends tx": 3.0, "checkpointer": 0.4},
                  counters={"wal_bytes": 4e8, "wal_syncs": 1600.0, "batches": 1600.0},
                  waits={"backends tx": {"idle": 10, "Lock:object": 6, "running": 4}},
                  backends={"backends tx": 4})
    pairs = [PairRun("peer1", "peer2", 300.0, None, 20.0, [300.0] * 8, 0),
             PairRun("peer3", "peer4", 100.0, None, 30.0, [100.0] * 4 + [20.0] * 4, 2)]
    return LongRun(4, 8.0, pairs, [Segment(0.0, usage), Segment(4.0, usage)],
                   [Event("midnight (database clock)", 4.2), Event("CHECKPOINT", 2.0, 0.5),
                    Event(meshlongreport.SERVER_CHECKPOINT, 6.0, detail="wal")],
                   {"2026-12-04": 10, "2026-12-05": 12}, {"no_route": 3.0},
                   {"started": "now", "standby": True, "replication": "sync", "segment": 4})


def test_the_report_names_every_event_segment_and_day():
    md = meshlongreport.markdown(long_run())
    assert "a standby (pg_stat_replication.sync_state at the end: sync)" in md
    assert "| midnight (database clock) | 4.2 | - | 400.0 | 320.0 | 320.0 | - |" in md
    assert "| CHECKPOINT | 2.0 | 0.50 |" in md
    assert "| 1 checkpoints the server started (wal): medians | - | - | 373.3 | 320.0 |" in md
    assert "| slowest pair ÷ fair share | 0.50 |" in md
    assert "| TCP retransmissions, all pairs | 2 |" in md
    assert "2026-12-04: 10, 2026-12-05: 12" in md
    assert "| 0 | 400.0 | 0.50 / 0.85 | 100 | 100.0 | 400 | 400 | Lock:object 30% |" in md
    report = json.loads(meshlongreport.to_json(long_run()))
    assert report["aggregate_per_second"][4] == 320.0
    assert report["impacts"]["midnight (database clock)"]["worst"] == 320.0


def test_the_chart_is_written(tmp_path):
    path = tmp_path / "long.png"
    meshlongreport.chart(long_run(), path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_servers_own_checkpoints_are_read_off_its_log_by_its_clock():
    log = (
        "2026-12-04 23:59:50.000 UTC [7] LOG:  checkpoint starting: wal\n"
        "2026-12-04 23:59:58.600 UTC [7] LOG:  checkpoint starting: immediate force wait\n"
        "2026-12-05 00:00:04.500 UTC [7] LOG:  checkpoint complete: wrote 12 buffers (0.1%)\n"
        "2026-12-05 00:00:05.250 UTC [7] LOG:  checkpoint starting: time\n"
        "2026-12-05 00:00:30.000 UTC [7] LOG:  checkpoint starting: wal\n"
        "2026-12-05 00:00:06.000 UTC [9] STATEMENT:  checkpoint starting: wal\n")
    events = server_checkpoints(log, epoch("2026-12-04 23:59:55"), 20)
    assert [(e.at, e.detail) for e in events] == [(pytest.approx(10.25), "time")]
    assert all(e.name == meshlongreport.SERVER_CHECKPOINT for e in events)
