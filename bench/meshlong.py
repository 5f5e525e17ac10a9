"""`pgvpn bench mesh-long`: every pair of a mesh for minutes, through a checkpoint and midnight.

The short windows of `pgvpn bench mesh` miss what a loaded mesh meets over time: a checkpoint
(its writes beside the WAL flushes every commit waits for, then full-page images in the WAL),
and the database's day rollover (rows go into the next day's partition, yesterday's is closed:
housekeeping marks it for freezing and builds its address and port indexes). One N-peer lab
whose PostgreSQL's clock is moved (libfaketime; the hosts' clocks are left alone) so that
midnight UTC comes at --rollover-at of the window; a CHECKPOINT at --checkpoint-at; the closed
day's indexes built --index-after seconds after midnight, as housekeeping's hourly job would;
iperf3 on N/2 disjoint pairs for --seconds, reporting every second; the lab sampled by
bench.probe in --segment windows. The report gives throughput per second with the events
marked, the dip and the recovery around each one, the rows either side of midnight, drops and
retransmissions, and CPU, WAL and waits per segment.

    .venv/bin/pgvpn bench mesh-long --peers 10 --seconds 600
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench import meshlongreport
from bench.mesh import PHASES, SETTLE, PairRun, add_db_memory, lab_memory, lab_of, run_pairs
from bench.probe import Probe, Usage
from bench.tunnel import RESULTS
from pgvpn_agent.lab import CLOCK_CACHE, Lab, LabError
from pgvpn_agent.labtraffic import congestion_control

DROPPED = "pgvpn_packets_dropped_total"
CHECKPOINTS = "SELECT checkpoints_req FROM pg_stat_bgwriter"
LEAD = 3.0  # seconds between the clock's last step and the start of the traffic
STEP = 5.0  # seconds: the largest step of a live database's clock
MAX_ALIGN = 300.0
SERVER_CHECKPOINT = meshlongreport.SERVER_CHECKPOINT
# log_line_prefix '%m [%p] ' (the default): "2026-12-05 00:01:02.345 UTC [77] LOG:  checkpoint
# starting: wal"; a CHECKPOINT command's says "immediate force wait"
CHECKPOINT_LOG = re.compile(r"^(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC "
                            r"\[\d+\] LOG:  checkpoint starting: (?P<why>.*)$", re.MULTILINE)


@dataclass
class Event:
    name: str
    at: float  # seconds into the window
    seconds: float = 0.0  # how long it took, for the ones the bench runs
    detail: str = ""


@dataclass
class Segment:
    start: float  # seconds into the window
    usage: Usage


@dataclass
class LongRun:
    peers: int
    seconds: float
    pairs: list[PairRun]
    segments: list[Segment]
    events: list[Event]
    rows_by_day: dict[str, int]  # rows logged during the window, by the day of logged_at
    dropped: dict[str, float]  # agents' drops during the window, by reason
    meta: dict[str, Any] = field(default_factory=dict)
    reference: PairRun | None = None  # the first pair alone, in the same lab, just before


def clock_offset(now: float, midnight_in: float) -> float:
    """Seconds to move a clock reading `now` (epoch) so that UTC midnight comes `midnight_in`
    seconds later: always forward, less than a day."""
    target = now + midnight_in
    day = datetime.fromtimestamp(target, UTC).date() + timedelta(days=1)
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    return (midnight - target) % 86400.0


def _value(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None, query
    return row[0]


def up_estimate(peers: int) -> float:
    """Generous seconds for a lab to come up: the clock is set before PostgreSQL starts, for a
    midnight a little later than wanted, and stepped forward once the lab is up."""
    return 40.0 + 1.0 * peers


def align_midnight(lab: Lab, conn: psycopg.Connection[Any], midnight_in: float
                   ) -> tuple[float, float]:
    """Step the database's clock forward, STEP seconds at most at a time and while nothing
    flows, until its next midnight is `midnight_in` seconds away; returns its clock (epoch)
    and the host's monotonic clock, read together. A bigger step is a jump its wall-clock
    timeouts would see: a walsender's, the housekeeping watchdog's."""
    assert lab.db_clock is not None
    while True:
        db_now, mono = _value(conn, "SELECT extract(epoch FROM clock_timestamp())::float8"), \
            time.monotonic()
        later = 86400 - db_now % 86400 - midnight_in
        if later <= 0.5:
            break
        if later > MAX_ALIGN:
            raise LabError(f"the database's midnight is {later:.0f}s later than wanted: the "
                           f"lab came up faster than the estimate by more than {MAX_ALIGN:.0f}s")
        lab.set_db_clock(lab.db_clock + min(STEP, later))
        time.sleep(2 * CLOCK_CACHE + 0.3)  # every process has read it (ours included)
    if 86400 - db_now % 86400 < LEAD + 1:
        raise LabError("the database's midnight came before the run could start: the lab took "
                       "longer to come up than bench.meshlong.up_estimate allows")
    return db_now, mono


def server_checkpoints(log: str, start: float, seconds: float) -> list[Event]:
    """The checkpoints the server started itself in the window (by WAL volume or time), from
    its log (log_checkpoints, on by default; stamped by its own clock, as `start` is)."""
    out = []
    for m in CHECKPOINT_LOG.finditer(log):
        stamp = datetime.fromisoformat(m["stamp"]).replace(tzinfo=UTC).timestamp()
        if m["why"].split()[0] != "immediate" and 0 <= stamp - start <= seconds:
            out.append(Event(SERVER_CHECKPOINT, stamp - start, detail=m["why"].strip()))
    return out


def dropped(lab: Lab) -> dict[str, float]:
    """Every agent's drops by reason, summed."""
    out: dict[str, float] = {}
    for peer in lab.peers:
        for key, value in lab.agent_metrics(peer).items():
            if key.startswith(DROPPED + "{"):
                reason = key.split('reason="', 1)[1].split('"', 1)[0]
                out[reason] = out.get(reason, 0.0) + value
    return out


class Timed:
    """An event the bench causes at a given second of the window, in a thread of its own; its
    failure fails the run."""

    def __init__(self, name: str, at: float, sql: str, dsn: str) -> None:
        self.event = Event(name, at)
        self.sql, self.dsn = sql, dsn
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.t0 = 0.0

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.thread.start()

    def _run(self) -> None:
        try:
            time.sleep(max(0.0, self.t0 + self.event.at - time.monotonic()))
            started = time.monotonic()
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                cur = conn.execute(self.sql)
                row = cur.fetchone() if cur.description else None
            self.event.at = started - self.t0
            self.event.seconds = time.monotonic() - started
            self.event.detail = "" if row is None or row[0] is None else str(row[0])
        except BaseException as exc:  # re-raised by the main thread (join)
            self.error = exc

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise LabError(f"{self.event.name}: {self.error}") from self.error


def run(lab: Lab, seconds: float, segment: float, checkpoint_at: float, rollover_at: float,
        index_after: float, congestion: str | None, reference: float = 0.0) -> LongRun:
    phase = next(p for p in PHASES if p.key == "mesh")
    peers = lab.peers
    pairs = [(peers[i], peers[i + 1]) for i in range(0, len(peers) - 1, 2)]
    dsn = lab.dsn()
    alone = run_pairs(lab, pairs[:1], phase, reference, congestion)[0] if reference else None
    if alone is not None:
        time.sleep(SETTLE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        db_now, mono = align_midnight(lab, conn, LEAD + rollover_at * seconds)
        midnight = (db_now // 86400 + 1) * 86400  # the database's next midnight, epoch
        time.sleep(max(0.0, LEAD - (time.monotonic() - mono)))
        checkpoints0 = _value(conn, CHECKPOINTS)
    drops0 = dropped(lab)
    timed = [Timed("CHECKPOINT", checkpoint_at * seconds, "CHECKPOINT", dsn)]
    t0 = time.monotonic()
    at_midnight = midnight - db_now - (t0 - mono)
    if not (at_midnight > 0 and at_midnight + index_after < seconds):
        raise LabError(f"the database's midnight would come {at_midnight:.0f}s into a "
                       f"{seconds:.0f}s run (its closed-day indexes {index_after:.0f}s later): "
                       "outside it")
    timed.append(Timed("closed-day indexes", at_midnight + index_after,
                       "SELECT pgvpn.index_closed_days()", dsn))
    window_start = datetime.fromtimestamp(db_now + (t0 - mono), UTC)
    results: list[PairRun] = []
    failure: list[BaseException] = []

    def traffic() -> None:
        try:
            results.extend(run_pairs(lab, pairs, phase, seconds, congestion))
        except BaseException as exc:  # re-raised below
            failure.append(exc)

    mover = threading.Thread(target=traffic, name="iperf3")
    mover.start()
    for t in timed:
        t.start(t0)
    segments: list[Segment] = []
    while mover.is_alive() and (start := time.monotonic() - t0) < seconds - 1:
        probe = Probe(lab, memory=False)
        probe.start()
        mover.join(timeout=min(segment, seconds - start))
        segments.append(Segment(start, probe.stop()))
    mover.join()  # iperf3's last reports
    for t in timed:
        t.join()
    if failure:
        raise LabError(f"iperf3: {failure[0]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        by_day = conn.execute(
            "SELECT (logged_at AT TIME ZONE 'UTC')::date::text, count(*) FROM pgvpn.packet "
            "WHERE logged_at >= %s GROUP BY 1 ORDER BY 1", (window_start,)).fetchall()
        checkpoints = _value(conn, CHECKPOINTS) - checkpoints0
        replication = _value(conn, "SELECT coalesce(string_agg(sync_state, ','), 'none') "
                                   "FROM pg_stat_replication")
    drops1 = dropped(lab)
    events = [Event("midnight (database clock)", at_midnight), *(t.event for t in timed),
              *server_checkpoints(lab.pglog.read_text(errors="replace"),
                                  window_start.timestamp(), seconds)]
    events.sort(key=lambda e: e.at)
    return LongRun(len(peers), seconds, results, segments, events, dict(by_day),
                   {k: v - drops0.get(k, 0.0) for k, v in drops1.items()
                    if v - drops0.get(k, 0.0) > 0},
                   {"checkpoints_requested": checkpoints, "replication": replication,
                    "window_start_db": window_start.isoformat(timespec="seconds")}, alone)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pgvpn bench mesh-long", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=10, help="peers in the lab (default 10)")
    p.add_argument("--seconds", type=float, default=600.0, help="length of the run (600)")
    p.add_argument("--segment", type=float, default=10.0,
                   help="seconds per sample of CPU, WAL and waits (10)")
    p.add_argument("--checkpoint-at", type=float, default=0.25,
                   help="when the CHECKPOINT is issued, as a fraction of the run (0.25)")
    p.add_argument("--rollover-at", type=float, default=0.5,
                   help="when the database's clock passes midnight, as a fraction (0.5)")
    p.add_argument("--index-after", type=float, default=30.0,
                   help="seconds after midnight that the closed day's indexes are built (30)")
    p.add_argument("--reference", type=float, default=60.0,
                   help="seconds of the first pair alone in the same lab before the run, the "
                        "figure the run's total is compared with (60; 0: none)")
    p.add_argument("--congestion", metavar="ALGORITHM",
                   help="the iperf3 flows' TCP congestion control (default: the kernel's)")
    p.add_argument("--standby", action="store_true",
                   help="with a synchronous streaming standby")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output dir (default {RESULTS})")
    add_db_memory(p)
    args = p.parse_args(argv)
    if args.peers < 2 or args.peers % 2:
        p.error("--peers: an even number, at least 2")
    if not (0 < args.checkpoint_at < 1 and 0 < args.rollover_at < 1):
        p.error("--checkpoint-at and --rollover-at are fractions of the run, between 0 and 1")
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "loadavg_before": os.getloadavg()[0], "standby": args.standby,
            "congestion": congestion_control(args.congestion), "segment": args.segment,
            "db_memory_mb": lab_memory(args.db_memory, args.peers)}
    try:
        wait = (up_estimate(args.peers) + args.reference + (SETTLE if args.reference else 0)
                + LEAD + args.rollover_at * args.seconds)
        with lab_of(args.peers, "l", standby=args.standby, db_memory=args.db_memory,
                    db_clock=clock_offset(time.time(), wait)) as lab:
            result = run(lab, args.seconds, args.segment, args.checkpoint_at, args.rollover_at,
                         args.index_after, args.congestion, args.reference)
    except LabError as exc:
        print(f"pgvpn bench mesh-long: error: {exc}", file=sys.stderr)
        return 2
    result.meta.update(meta, loadavg_after=os.getloadavg()[0])
    print(meshlongreport.markdown(result))
    for path in meshlongreport.write(result, args.out):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
