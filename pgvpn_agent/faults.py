"""Kill points: where a fault test kills the agent, on purpose rather than by a well-timed sleep.

`PGVPN_KILL_AT=<point>:<n>` makes the agent SIGKILL itself the n-th time it passes <point>; the
fault tests run each point many times with different n (tests/integration/test_kill_points.py).
Unset, as in production, a point costs the agent one test of a module global.

Points, in the order a packet meets them:
- sender.before_commit: a batch built from the TUN queue, not yet sent;
- sender.carrying: the same, when the batch also carries the receiver's cursors;
- sender.in_commit: SIGKILL from a timer while send_batch() is in flight (either outcome);
- sender.after_commit: send_batch() returned, the sender has not recorded it;
- receiver.before_write: a page fetched, nothing written to the TUN;
- receiver.after_write: the page written to the TUN, its cursors neither noted nor saved.
"""

from __future__ import annotations

import os
import random
import signal
import threading

POINTS = frozenset({"sender.before_commit", "sender.carrying", "sender.in_commit",
                    "sender.after_commit", "receiver.before_write", "receiver.after_write"})
ENV = "PGVPN_KILL_AT"


def parse(spec: str) -> tuple[str, int] | None:
    """`point:n` -> (point, n); empty -> None; anything else is a clear error."""
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<n> with n >= 1 and point one of "
                         f"{', '.join(sorted(POINTS))}")
    return point, int(count)


_armed = parse(os.environ.get(ENV, ""))
# The point armed in this process, or None: call reached() only when it is the caller's point.
ARMED: str | None = _armed[0] if _armed else None
_left = _armed[1] if _armed else 0
_lock = threading.Lock()


def reached(point: str) -> None:
    """Count a pass of `point`; at the n-th, the process dies as a power cut would end it."""
    global _left
    if point != ARMED:
        return
    with _lock:
        _left -= 1
        if _left > 0:
            return
    if point == "sender.in_commit":
        # Inside the statement's round trip: before, during or after the server's commit.
        threading.Timer(random.uniform(0.0, 0.002), _kill).start()
        return
    _kill()


def _kill() -> None:
    # One line on stderr (the agent's journal) first: the test reads where each death was.
    os.write(2, f"pgvpn: kill point {ARMED} reached, SIGKILL\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
