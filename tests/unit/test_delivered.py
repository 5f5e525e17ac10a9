"""Cursors handed from the receiver to the next batch: nothing taken twice, nothing lost."""

from __future__ import annotations

import threading
import time

from pgvpn_agent.delivered import Delivered


def test_take_hands_out_the_latest_cursor_per_link_once():
    d = Delivered()
    assert d.oldest() is None and d.take() == {}
    d.post({1: 5})
    d.post({1: 7, 2: 3})
    assert d.take() == {1: 7, 2: 3}
    assert d.oldest() is None
    d.finished(committed=True)
    assert d.take() == {}


def test_oldest_is_the_first_post_since_the_last_take():
    d = Delivered()
    d.post({1: 1})
    first = d.oldest()
    time.sleep(0.01)
    d.post({1: 2})
    assert d.oldest() == first
    d.take()
    d.finished(committed=True)
    d.post({1: 3})
    assert d.oldest() is not None and first is not None and d.oldest() > first


def test_only_one_transaction_carries_cursors_at_a_time():
    d = Delivered()
    d.post({1: 5})
    assert d.take() == {1: 5}
    d.post({1: 6})
    assert d.take() == {}, "a second transaction must not lock the same rows"
    assert d.in_flight()
    d.finished(committed=True)
    assert not d.in_flight()
    assert d.take() == {1: 6}


def test_a_failed_transaction_puts_its_cursors_back_with_their_age():
    d = Delivered()
    d.post({1: 5, 2: 9})
    posted = d.oldest()
    carried = d.take()
    time.sleep(0.01)
    d.post({1: 6})  # delivered while the batch was in flight
    d.finished(committed=False)
    assert d.oldest() == posted, "the restored cursors are as overdue as they were"
    assert d.take() == {1: 6, 2: 9} and carried == {1: 5, 2: 9}


def test_a_failed_transaction_alone_is_pending_again():
    d = Delivered()
    d.post({3: 4})
    posted = d.oldest()
    d.take()
    assert d.oldest() is None
    d.finished(committed=False)
    assert d.oldest() == posted
    assert d.take() == {3: 4}


def test_settle_waits_for_the_transaction_in_flight():
    d = Delivered()
    d.post({1: 1})
    d.take()
    threading.Timer(0.05, d.finished, kwargs={"committed": True}).start()
    started = time.monotonic()
    d.settle(timeout=5)
    assert 0.03 < time.monotonic() - started < 2
    d.settle(timeout=5)  # nothing in flight: returns at once


def test_carry_finishes_only_what_it_took():
    d = Delivered()
    d.post({1: 5})
    with d.carry() as first:
        assert first == {1: 5}
        d.post({1: 6})
        with d.carry() as second:
            assert second == {}  # the first transaction is in flight
        assert d.take() == {}, "an empty carry must not release the first one's claim"
    assert d.take() == {1: 6}


def test_carry_puts_the_cursors_back_when_the_block_fails():
    d = Delivered()
    d.post({2: 3})
    try:
        with d.carry():
            raise RuntimeError("connection lost")
    except RuntimeError:
        pass
    assert d.take() == {2: 3}
