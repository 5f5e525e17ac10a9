"""Receiver cursors that reached the TUN but are not committed yet.

Saving the cursor after every page the receiver delivers is a transaction of its own, and most
pages are answered at once by the same agent: the kernel writes TCP ACKs and ping replies to
the TUN while the page is still being written, and the sender logs them a moment later. That
batch carries the cursors in its own transaction (`send_batch(…, c_src, c_last)`); the receiver
commits them itself only when no batch took them within `transport.save_delay`.

At most one transaction carries cursors at a time (taken here, then finished), so the sender
and the receiver never lock the same cursor rows against each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# A page the receiver writes of at least this many bytes: this peer takes in a flow (bulk_at).
BULK = 16384


class Delivered:
    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._pending: dict[int, int] = {}
        self._since = 0.0  # monotonic time of the oldest pending delivery
        self._carried: dict[int, int] | None = None
        self._carried_since = 0.0
        # Monotonic time the sender last started the second (or later) batch in a row whose
        # packets were already waiting (traffic in full flow). Meanwhile the receiver leaves
        # what notifications carry and reads the table in pages, as NAPI polls a busy NIC:
        # replies taken one notification at a time hurried the flow's ACKs and shrank its
        # batches (receiver.FLOW_WINDOW).
        self.flow_at = 0.0
        # Per source peer, monotonic time the receiver last wrote at least BULK bytes of its
        # packets in one page: the sender's next batches to that peer are likely the flow's
        # ACKs (sender.wakes_in_commit).
        self.bulk_at: dict[int, float] = {}

    def post(self, cursors: Mapping[int, int]) -> None:
        """The receiver wrote these packets (last sequence number per source peer)."""
        with self._lock:
            if not self._pending:
                self._since = time.monotonic()
            self._pending.update(cursors)

    def oldest(self) -> float | None:
        """When the oldest delivery not yet taken by a transaction was posted (monotonic)."""
        with self._lock:
            return self._since if self._pending else None

    def in_flight(self) -> bool:
        """A transaction carries cursors now: take() returns nothing until it finishes."""
        with self._lock:
            return self._carried is not None

    def take(self) -> dict[int, int]:
        """The pending cursors, for one transaction; {} if none or one is already in flight."""
        with self._lock:
            if self._carried is not None or not self._pending:
                return {}
            self._carried, self._pending = self._pending, {}
            self._carried_since = self._since
            return dict(self._carried)

    @contextmanager
    def carry(self) -> Iterator[dict[int, int]]:
        """take() for the transaction in the block, finished() by how the block ends.

        An error says nothing certain about the commit, so the cursors are pending again: at
        worst committed twice (a cursor only moves forward). Nothing taken, nothing finished:
        the transaction in flight elsewhere keeps its claim.
        """
        cursors = self.take()
        if not cursors:
            yield cursors
            return
        try:
            yield cursors
        except BaseException:
            self.finished(committed=False)
            raise
        self.finished(committed=True)

    def finished(self, committed: bool) -> None:
        """The transaction that took them committed, or did not (then they are pending again)."""
        with self._lock:
            carried, self._carried = self._carried, None
            if carried is not None and not committed:
                self._since = (min(self._since, self._carried_since) if self._pending
                               else self._carried_since)
                for src, seq in carried.items():
                    if seq > self._pending.get(src, 0):
                        self._pending[src] = seq
            self._lock.notify_all()

    def settle(self, timeout: float) -> None:
        """Wait until no transaction carries cursors (shutdown)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._carried is not None and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
