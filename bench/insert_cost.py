"""What an index on today's partition would cost the tunnel: send_batch() time per row.

`pgvpn log` filters by address and port; indexes on those columns make the filters fast, but
the insert into today's partition is the tunnel's hot path, and an index there costs every
packet. This measures that cost the way the sender pays it (prepared `send_batch()`, binary
arrays from `wire`, one transaction and WAL flush per batch of 256 1428-byte packets) into a
partition that already holds a day's worth of rows, with 0, 1, 2 and 4 such indexes, the
variants round-robin so a noisy machine's load hits them alike. It is why only closed days
get those indexes (migration 0006).

    .venv/bin/python -m bench.insert_cost [--prefill 1000000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Any

import psycopg

from bench.testbeds import scratch_dir
from pgvpn_agent import wire
from pgvpn_agent.lab import Lab
from pgvpn_agent.sender import SEND_BATCH

BATCH = 256
BATCHES = 120
WARMUP = 5
VARIANTS = {
    "none": (),
    "dst_port": ("dst_port",),
    "both ports": ("src_port", "dst_port"),
    "ports + addresses": ("src_addr", "dst_addr", "src_port", "dst_port"),
}

# A day's headers (250 hosts, ephemeral source ports, five service ports); a tiny payload: only
# the indexes' size matters here, not the heap's.
PREFILL = """
INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, ip_version, src_addr, dst_addr,
                          protocol, src_port, dst_port, length, payload)
SELECT %(src)s, %(dst)s, g, now(), 4, ('10.1.' || (g %% 4) || '.' || (g %% 250))::inet,
       ('10.2.' || (g %% 7) || '.' || (g %% 211))::inet, 6, 1024 + (g::bigint * 7919) %% 60000,
       (ARRAY[22, 53, 80, 443, 5432])[1 + g %% 5], 1400, '\\x45'::bytea
FROM generate_series(1, %(rows)s) g
"""


class Batches:
    """send_batch() arguments for one link, sequence numbers continuing from batch to batch."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.seq = 0
        self.rnd = random.Random(1)
        self.payload = os.urandom(1428)  # as long as its rows say (send_batch() checks)

    def next(self) -> tuple[Any, ...]:
        rnd, first = self.rnd, self.seq + 1
        self.seq += BATCH
        seqs = list(range(first, self.seq + 1))
        src_addr = [wire.INET4 + bytes([10, 77, 0, rnd.randrange(1, 250)]) for _ in seqs]
        dst_addr = [wire.INET4 + bytes([10, rnd.randrange(1, 9), rnd.randrange(256),
                                        rnd.randrange(1, 255)]) for _ in seqs]
        return (self.src, False, wire.fixed("int2", [self.dst]), wire.fixed("int8", [first]),
                wire.fixed("int8", [self.seq]), wire.fixed("int2", [self.dst] * BATCH),
                wire.fixed("int8", seqs), wire.timestamps([time.time()] * BATCH),
                wire.fixed("int2", [4] * BATCH), wire.blobs("inet", src_addr),
                wire.blobs("inet", dst_addr), wire.fixed("int2", [6] * BATCH),
                wire.nullable_int4([rnd.randrange(1024, 65536) for _ in seqs]),
                wire.nullable_int4([rnd.choice((22, 53, 80, 443, rnd.randrange(1024, 65536)))
                                    for _ in seqs]),
                wire.fixed("int4", [1428] * BATCH), wire.booleans([False] * BATCH),
                wire.blobs("bytea", [self.payload] * BATCH), wire.blobs("bytea", [None] * BATCH),
                wire.fixed("int2", []), wire.fixed("int8", []))


def measure(lab: Lab, prefill: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per row of each variant, one sample per round."""
    part = lab.psql("SELECT 'pgvpn.packet_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')")
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with psycopg.connect(lab.dsn("pgvpn_peer1"), autocommit=True) as conn:
        wire.register(conn)
        ids: dict[str, int] = dict(conn.execute("SELECT name, id FROM pgvpn.peer "
                                               "WHERE name = ANY (%s)",
                                               (["peer1", "peer2"],)).fetchall())
        # the day so far arrived on the other link, so its sequence numbers never collide
        with psycopg.connect(lab.dsn(), autocommit=True) as admin:
            admin.execute(PREFILL, {"src": ids["peer2"], "dst": ids["peer1"], "rows": prefill})
            admin.execute(f"VACUUM ANALYZE {part}")
            batches = Batches(ids["peer1"], ids["peer2"])
            for _ in range(rounds):
                for name, columns in VARIANTS.items():
                    for c in columns:
                        admin.execute(f"CREATE INDEX bench_{c} ON {part} ({c})")
                    args = [batches.next() for _ in range(BATCHES)]
                    for a in args[:WARMUP]:
                        conn.execute(SEND_BATCH, a, prepare=True)
                    started = time.perf_counter()
                    for a in args[WARMUP:]:
                        conn.execute(SEND_BATCH, a, prepare=True)
                    took = time.perf_counter() - started
                    samples[name].append(took / ((BATCHES - WARMUP) * BATCH))
                    for c in columns:
                        admin.execute(f"DROP INDEX pgvpn.bench_{c}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefill", type=int, default=1_000_000, help="rows already in the day")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--port", type=int, default=57311, help="the throwaway cluster's port")
    args = parser.parse_args()
    workdir = scratch_dir("insert-cost")
    lab = Lab.create(workdir, peers=2, prefix="pgvic-", port=args.port)
    lab.up(agents=False)
    try:
        samples = measure(lab, args.prefill, args.rounds)
    finally:
        lab.down()
    base = statistics.median(samples["none"])
    print(f"send_batch() per row, batches of {BATCH} x 1428 B, into a day of {args.prefill} "
          f"rows; medians of {args.rounds} rounds")
    for name, values in samples.items():
        median = statistics.median(values)
        spread = f"{min(values) * 1e6:.1f}-{max(values) * 1e6:.1f}"
        change = 100 * (median / base - 1)
        print(f"{name:18} {median * 1e6:6.1f} us/row ({spread})  {change:+5.1f} %")


if __name__ == "__main__":
    main()
