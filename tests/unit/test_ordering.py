"""The fault tests' order check: what it accepts and what it catches."""

from __future__ import annotations

import pytest

from tests.ordering import walk

LOG = [1, 2, 3, 5, 6, 8]  # 4 and 7 were never logged (a sender killed with them queued)


def test_exact_delivery_has_no_rewind():
    w = walk(LOG, LOG)
    assert (w.delivered, w.repeats, w.rewinds) == (6, 0, [])


def test_a_restarted_receiver_may_deliver_again_from_its_cursor():
    w = walk([1, 2, 3, 5, 3, 5, 6, 8], LOG)
    assert w.rewinds == [(2, 4)] and w.repeats == 2 and w.delivered == 6


def test_two_rewinds_are_both_recorded():
    w = walk([1, 2, 1, 2, 3, 5, 5, 6, 8], LOG)
    assert w.rewinds == [(0, 2), (3, 4)] and w.repeats == 3


@pytest.mark.parametrize(("received", "message"), [
    ([1, 3, 2, 5, 6, 8], "skipped or reordered"),
    ([1, 2, 3, 5, 6], "never delivered"),
    ([1, 2, 3, 4, 5, 6, 8], "never logged"),
    ([1, 2, 3, 5, 2, 5, 6, 8], "skipped or reordered"),  # a rewind that skips 3
])
def test_disorder_loss_and_strangers_fail(received, message):
    with pytest.raises(AssertionError, match=message):
        walk(received, LOG)


def test_a_log_out_of_sending_order_fails():
    with pytest.raises(AssertionError, match="out of their sending order"):
        walk([1, 3, 2], [1, 3, 2])
