"""What became of a page of rows a receiver wrote: counted in its loop with plain locals (the
loop runs per row), reported once per page here, as log lines and metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pgvpn_agent import metrics

log = logging.getLogger("pgvpn_agent.receiver")


@dataclass
class PageCount:
    stale: int = 0
    refused: int = 0
    unsealable: int = 0
    forged: int = 0
    malformed: int = 0
    bad: dict[int, int] = field(default_factory=dict)  # sender id: from sources it does not own
    gaps: dict[int, int] = field(default_factory=dict)  # sender id: numbers missing from the log
    repeated: dict[int, int] = field(default_factory=dict)  # sender id: numbers that came again
    per_link: dict[int, list[int]] = field(default_factory=dict)  # sender id: [packets, bytes]

    def report(self, names: dict[int, str], last: dict[int, int], done: float) -> None:
        """Drops, gaps and repeats as warnings and counters; what was written per link."""
        if self.stale:
            metrics.DROPPED.labels("too_old").inc(self.stale)
        if self.refused:
            metrics.DROPPED.labels("tun_write").inc(self.refused)
        if self.unsealable:
            metrics.DROPPED.labels("unsealable").inc(self.unsealable)
        for src, missing in self.gaps.items():
            log.warning("receiver: %d sequence numbers from %s are missing from the log "
                        "(up to %d): lost by the database (retention, a restore)",
                        missing, names.get(src, src), last[src])
            metrics.SEQUENCE_GAPS.labels(names.get(src, str(src))).inc(missing)
        for src, n in self.repeated.items():
            log.warning("receiver: dropped %d stored packets from %s whose sequence numbers "
                        "the log holds more than once (rows not written by send_batch())",
                        n, names.get(src, src))
            metrics.DROPPED.labels("repeated").inc(n)
        if self.forged:
            log.warning("receiver: dropped %d stored packets whose offload header no kernel "
                        "would have produced", self.forged)
            metrics.DROPPED.labels("malformed").inc(self.forged)
        if self.malformed:
            log.warning("receiver: dropped %d stored packets that are not IPv4 or IPv6 or "
                        "too short to hold a source address", self.malformed)
            metrics.DROPPED.labels("malformed").inc(self.malformed)
        if self.bad:
            log.warning("receiver: dropped stored packets whose source address is not among "
                        "their sender's addresses and routes: %s", ", ".join(
                            f"{n} from {names.get(s, f'peer id {s} (not in the config)')}"
                            for s, n in self.bad.items()))
            metrics.DROPPED.labels("bad_source").inc(sum(self.bad.values()))
        for src, (n, size) in self.per_link.items():
            metrics.PACKETS.labels("rx", names[src]).inc(n)
            metrics.BYTES.labels("rx", names[src]).inc(size)
            metrics.LAST_PACKET.labels("rx", names[src]).set(done)
