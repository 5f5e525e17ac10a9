"""What overlapping a sender's batches could give at most: two connections against one.

A sender commits its batches one after the other; while one commits (the WAL flush), the next
waits in the agent. Two connections, each with its own batches, let one insert while the other
commits. Before building that into the agent (the second batch's link update must wait for
the first's commit, in order), this measures its ceiling: the same batches of 9 rows x 60 kB
(one flow's offloaded bursts) from one peer login, sent by one connection alternating two links
or by two connections at once (one link each), while a reader per link fetches every row as it
commits. Rounds alternate the order (the second window of a pair ran slower on this machine);
the ratio of each pair and their geometric mean are printed.

    .venv/bin/python -m bench.overlap [--rounds 8] [--batches 300] [--db-memory 2048]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time
from typing import Any

import psycopg

from bench.testbeds import scratch_dir
from pgvpn_agent import wire
from pgvpn_agent.lab import Lab
from pgvpn_agent.sender import SEND_BATCH

ROWS, SIZE = 9, 60_000
LINKS = ("peer2", "peer3")
FETCH = ("SELECT seq, payload FROM pgvpn.packet WHERE src_peer = %s AND dst_peer = %s "
         "AND seq > %s ORDER BY seq LIMIT 64")


def batch(src: int, dst: int, first: int, payload: bytes) -> tuple[Any, ...]:
    """send_batch() arguments: ROWS rows of one link from `first` on."""
    seqs = list(range(first, first + ROWS))
    n = ROWS
    return (src, False, wire.fixed("int2", [dst]), wire.fixed("int8", [first]),
            wire.fixed("int8", [seqs[-1]]), wire.fixed("int2", [dst] * n),
            wire.fixed("int8", seqs), wire.timestamps([time.time()] * n),
            wire.fixed("int2", [4] * n),
            wire.blobs("inet", [wire.INET4 + bytes([10, 77, 0, src])] * n),
            wire.blobs("inet", [wire.INET4 + bytes([10, 77, 0, dst])] * n),
            wire.fixed("int2", [6] * n), wire.nullable_int4([40000] * n),
            wire.nullable_int4([5201] * n), wire.fixed("int4", [SIZE] * n),
            wire.booleans([False] * n), wire.blobs("bytea", [payload] * n),
            wire.blobs("bytea", [None] * n), wire.fixed("int2", []), wire.fixed("int8", []))


class Reader(threading.Thread):
    """Fetches a link's rows as they commit, as a receiver would (their reads cost the CPU)."""

    def __init__(self, lab: Lab, src: int, dst: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(lab.dsn(), autocommit=True)
        self.src, self.dst, self.stop, self.seq = src, dst, stop, 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                rows = self.conn.execute(FETCH, (self.src, self.dst, self.seq)).fetchall()
                if rows:
                    self.seq = rows[-1][0]
                else:
                    time.sleep(0.001)
        except BaseException as exc:  # reported by window()
            self.error = exc
        finally:
            self.conn.close()


def window(lab: Lab, ids: dict[str, int], seqs: dict[str, int], batches: int,
           two: bool) -> float:
    """Mbit/s of payload logged by `batches` batches, half to each link."""
    payload = os.urandom(SIZE)
    plans: dict[str, list[tuple[Any, ...]]] = {p: [] for p in LINKS}
    for i in range(batches):
        peer = LINKS[i % 2]
        plans[peer].append(batch(ids["peer1"], ids[peer], seqs[peer] + 1, payload))
        seqs[peer] += ROWS
    stop = threading.Event()
    readers = [Reader(lab, ids["peer1"], ids[p], stop) for p in LINKS]
    conns = [psycopg.connect(lab.dsn("pgvpn_peer1"), autocommit=True) for _ in LINKS]
    errors: list[BaseException] = []

    def send(conn: psycopg.Connection[Any], plan: list[tuple[Any, ...]]) -> None:
        try:
            for args in plan:
                conn.execute(SEND_BATCH, args, prepare=True)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    try:
        for conn in conns:
            wire.register(conn)
        for reader in readers:
            reader.start()
        started = time.perf_counter()
        if two:
            threads = [threading.Thread(target=send, args=(c, plans[p]))
                       for c, p in zip(conns, LINKS, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            send(conns[0], [a for pair in zip(*plans.values(), strict=True) for a in pair])
        took = time.perf_counter() - started
    finally:
        stop.set()
        for reader in readers:
            reader.join(10)
        for conn in conns:
            conn.close()
    for failure in errors + [r.error for r in readers if r.error is not None]:
        raise failure
    return batches * ROWS * SIZE * 8 / took / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batches", type=int, default=300, help="per window")
    parser.add_argument("--db-memory", type=int, default=2048,
                        help="the cluster's memory cgroup in MB (0: none), as bench mesh")
    parser.add_argument("--port", type=int, default=57411, help="the throwaway cluster's port")
    args = parser.parse_args()
    workdir = scratch_dir("overlap")
    lab = Lab.create(workdir, peers=3, prefix="pgvov-", port=args.port,
                     db_memory_mb=args.db_memory)
    lab.up(agents=False)
    pairs: list[tuple[float, float]] = []
    try:
        ids = {name: int(i) for name, i in (r.split("|") for r in lab.psql(
            "SELECT name, id FROM pgvpn.peer").splitlines())}
        seqs = dict.fromkeys(LINKS, 0)
        for n in range(args.rounds):
            order = (False, True) if n % 2 == 0 else (True, False)
            got = {two: window(lab, ids, seqs, args.batches, two) for two in order}
            pairs.append((got[False], got[True]))
            print(f"round {n + 1}: one connection {got[False]:7.1f}, two {got[True]:7.1f} "
                  f"Mbit/s ({'one' if not order[0] else 'two'} first): "
                  f"{got[True] / got[False]:.2f}x", flush=True)
    finally:
        lab.down()
    ratios = [two / one for one, two in pairs]
    mean = math.exp(statistics.fmean(math.log(r) for r in ratios))
    print(f"\n| | one connection | two connections |\n|---|---|---|\n"
          f"| Mbit/s, median of {len(pairs)} | {statistics.median(p[0] for p in pairs):.1f} | "
          f"{statistics.median(p[1] for p in pairs):.1f} |\n"
          f"| two / one per round | | {min(ratios):.2f}-{max(ratios):.2f}x, "
          f"geometric mean **{mean:.2f}x** |")


if __name__ == "__main__":
    main()
