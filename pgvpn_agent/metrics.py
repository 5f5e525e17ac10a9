"""Prometheus metrics, defined once; updated per batch, never per packet (the hot path)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                    5, 10)

PACKETS = Counter("pgvpn_packets", "IP packets carried, by direction (tx: TUN to database, "
                  "rx: database to TUN) and remote peer.", ["direction", "peer"])
BYTES = Counter("pgvpn_bytes", "IP packet bytes carried, by direction and remote peer.",
                ["direction", "peer"])
DROPPED = Counter("pgvpn_packets_dropped", "Packets not carried, by reason: no_route, malformed, "
                  "queue_full, too_old, tun_write.", ["reason"])
BATCHES = Counter("pgvpn_insert_batches", "Transactions that logged a batch of packets.")
BATCH_SIZE = Histogram("pgvpn_batch_size_packets", "Packets per insert transaction.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
INSERT_SECONDS = Histogram("pgvpn_insert_duration_seconds", "Wall time of one batch insert "
                           "including commit.", buckets=_LATENCY_BUCKETS)
FETCH_SECONDS = Histogram("pgvpn_fetch_duration_seconds", "Wall time of one fetch of new rows "
                          "for this peer.", buckets=_LATENCY_BUCKETS)
WAKEUPS = Counter("pgvpn_wakeups", "Receiver wake-ups, by cause: notify or poll.", ["cause"])
RECONNECTS = Counter("pgvpn_db_reconnects", "Database connections re-established after a loss, "
                     "by direction.", ["direction"])
DB_UP = Gauge("pgvpn_db_up", "1 while the direction's database connection is usable.",
              ["direction"])
QUEUE_DEPTH = Gauge("pgvpn_queue_depth_packets", "Packets read from TUN waiting to be logged.")
