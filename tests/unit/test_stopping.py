"""The stop request: select()-able, safe to set from a signal handler, idempotent."""

from __future__ import annotations

import os
import select
import signal
import threading
import time

from pgvpn_agent.stopping import Stop


def test_unset_it_waits_out_its_timeout_and_is_not_readable():
    stop = Stop()
    started = time.monotonic()
    assert stop.wait(0.05) is False
    assert time.monotonic() - started >= 0.05
    assert select.select([stop], [], [], 0)[0] == []


def test_set_wakes_a_thread_blocked_in_select_at_once():
    stop = Stop()
    woke: list[float] = []

    def blocked() -> None:
        select.select([stop.fileno()], [], [], 10)
        woke.append(time.monotonic())

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.05)
    at = time.monotonic()
    stop.set()
    t.join(2)
    assert woke and woke[0] - at < 0.5
    assert stop.is_set() and stop.wait(10) is True


def test_set_from_a_signal_handler_ends_a_wait_without_timeout():
    stop = Stop()
    old = signal.signal(signal.SIGALRM, lambda *_: stop.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert stop.wait() is True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_setting_many_times_over_never_blocks():
    stop = Stop()
    for _ in range(200_000):  # more than a pipe holds
        stop.set()
    assert stop.is_set()


def test_its_descriptors_close_with_it():
    stop = Stop()
    fd = stop.fileno()
    del stop
    try:
        os.fstat(fd)
    except OSError:
        return
    raise AssertionError(f"fd {fd} still open")
