"""The agent's stop request, something its threads can select() on beside their own sockets.

A worker blocked in select() on the TUN or on the database socket used to notice SIGTERM only
when its timeout (the poll interval) ran out: `systemctl stop` and every restart of a rolling
deployment took a second longer than needed, a second the tunnel was down. A pipe that becomes
readable at the request ends every such wait at once.
"""

from __future__ import annotations

import errno
import os
import select
import weakref
from typing import Any

import psycopg


class Stop:
    """Like threading.Event for is_set()/wait(), plus fileno() for select().

    set() is only an assignment and a write to a non-blocking pipe, so a signal handler may
    call it: threading.Event.set() takes a lock the interrupted main thread may be holding.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._set = False
        weakref.finalize(self, _close, self._r, self._w)

    def set(self) -> None:
        self._set = True
        try:
            os.write(self._w, b"\0")
        except OSError as exc:  # full (set many times over) or closed: readable either way
            if exc.errno not in (errno.EAGAIN, errno.EBADF):
                raise

    def is_set(self) -> bool:
        return self._set

    def fileno(self) -> int:
        return self._r

    def wait(self, timeout: float | None = None) -> bool:
        if not self._set:
            select.select([self._r], [], [], timeout)
        return self._set


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def notifications(conn: psycopg.Connection[Any], timeout: float,
                  stop: Stop) -> list[psycopg.Notify]:
    """The notifications that arrive within `timeout` (all those of the first packet that
    brings any), or none once `stop` is set."""
    notes = list(conn.notifies(timeout=0))  # queued while a query ran, or already readable
    if notes or timeout <= 0 or stop.is_set():
        return notes
    sock = conn.fileno()
    ready, _, _ = select.select([sock, stop.fileno()], [], [], timeout)
    if sock in ready:
        notes = list(conn.notifies(timeout=0))
    return notes
