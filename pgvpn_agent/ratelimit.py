"""The sender's own limit: a peer that floods its tunnel cannot flood the database with it.

Token buckets, one in packets and one in bytes, refilled once per drain of the TUN queue (not
per packet: the check must cost the hot path next to nothing). Packets over the limit are
dropped before they are queued, so the kernel's TUN queue never backs up behind them and TCP
sees the loss at once.
"""

from __future__ import annotations

import math
import time

from pgvpn_agent.config import Config
from pgvpn_agent.packet import MAX_PACKET


class RateLimit:
    def __init__(self, packets: float, nbytes: float, burst: float, min_bytes: int) -> None:
        """Rates per second; 0 is unlimited (an infinite bucket). The buckets hold `burst` seconds
        of each, the byte bucket at least `min_bytes` so that a full-MTU packet can ever pass."""
        self.packet_rate = float(packets)
        self.byte_rate = float(nbytes)
        self.packet_cap = max(1.0, packets * burst) if packets else math.inf
        self.byte_cap = max(float(min_bytes), nbytes * burst) if nbytes else math.inf
        self.packets = self.packet_cap
        self.bytes = self.byte_cap
        self.at = time.monotonic()

    @classmethod
    def from_config(cls, config: Config) -> RateLimit | None:
        t = config.transport
        if not t.rate_limit_packets and not t.rate_limit_bytes:
            return None
        # With TUN offload one read can be a 64 KB burst: the byte bucket must hold one.
        largest = MAX_PACKET if config.tun.offload else config.tun.mtu
        return cls(t.rate_limit_packets, t.rate_limit_bytes, t.rate_limit_burst, largest)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.at)
        self.at = now
        self.packets = min(self.packet_cap, self.packets + elapsed * self.packet_rate)
        self.bytes = min(self.byte_cap, self.bytes + elapsed * self.byte_rate)

    def take(self, size: int) -> bool:
        """Spend the tokens for one packet of `size` bytes, if the buckets hold them."""
        if self.packets < 1.0 or self.bytes < size:
            return False
        self.packets -= 1.0
        self.bytes -= size
        return True
