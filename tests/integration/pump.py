"""Numbered datagrams pumped through the real agents in a thread, checked in order at the end.

A Pump sends one datagram every `every` seconds from src to dst (udpstream.py in the two
namespaces) and records which ones the sending kernel accepted; its thread's failure fails the
test. `finish` waits until everything logged has arrived and replays the arrivals against the
log in sequence order (tests/ordering.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg

from pgvpn_agent.lab import Lab, LabPeer
from tests.integration.stream import Stream
from tests.ordering import Walk, walk


class Pump:
    def __init__(self, lab: Lab, src: LabPeer, dst: LabPeer, port: int,
                 every: float = 0.02) -> None:
        self.stream = Stream(lab, src, dst, port=port)
        self.lab = lab
        self.port = port
        self.every = every
        self.sent = 0
        self.accepted: list[int] = []  # numbers the sending kernel took (a route existed)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"pump-{port}")
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.sent += 1
                if self.stream.send(self.sent):
                    self.accepted.append(self.sent)
                time.sleep(self.every)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def first_arrival(self, after: float, above: int = 0) -> float | None:
        """Monotonic time of the first arrival after `after` of a datagram numbered > `above`."""
        with self.stream._lock:
            pairs = list(zip(self.stream.received, self.stream.times, strict=True))
        return next((t for n, t in pairs if t > after and n > above), None)

    def halt(self) -> None:
        self.stop.set()
        self.thread.join()
        assert self.error is None, self.error

    def finish(self, settle: float = 30.0,
               unlogged: bool = False) -> tuple[list[int], list[int], Walk]:
        """Stop sending; wait for the log to be delivered; (logged, received, walk).

        `unlogged`: arrivals the log does not hold are allowed (a failover: read on the old
        primary, never on the new one) and left out of the walk; each may still come once.
        """
        self.halt()
        # what the sending agent had queued at the halt may still be committing: the log is
        # read once it stops growing
        logged = logged_numbers(self.lab, self.port)
        while (again := _after(0.5, lambda: logged_numbers(self.lab, self.port))) != logged:
            logged = again
        deadline = time.monotonic() + settle
        while (len(set(self.stream.received)) < len(logged)
               and time.monotonic() < deadline):
            time.sleep(0.2)
        received = self.stream.close()
        if unlogged:
            held = set(logged)
            return logged, received, walk([n for n in received if n in held], logged)
        return logged, received, walk(received, logged)


def _after(seconds: float, read: Callable[[], list[int]]) -> list[int]:
    time.sleep(seconds)
    return read()


def logged_rows(lab: Lab, port: int) -> list[tuple[int, int]]:
    """(seq, datagram number) of every logged datagram to `port`, in sequence order."""
    with psycopg.connect(lab.dsn()) as conn:
        rows = conn.execute("SELECT seq, payload FROM pgvpn.packet WHERE dst_port = %s "
                            "ORDER BY seq", (port,)).fetchall()
    return [(int(seq), int(bytes(p)[28:].split(b" ", 1)[0])) for seq, p in rows]


def logged_numbers(lab: Lab, port: int) -> list[int]:
    return [n for _, n in logged_rows(lab, port)]


def back_after(pumps: list[Pump], after: float, timeout: float = 30.0) -> list[float]:
    """For each pump, the monotonic time its first datagram sent from now on arrived after
    `after` (the tunnel is back); fails if one does not within `timeout`."""
    sent = [p.sent for p in pumps]
    deadline = time.monotonic() + timeout
    while True:
        back = [p.first_arrival(after, above=n) for p, n in zip(pumps, sent, strict=True)]
        if None not in back:
            return [t for t in back if t is not None]
        assert time.monotonic() < deadline, "the tunnel did not come back"
        time.sleep(0.01)
