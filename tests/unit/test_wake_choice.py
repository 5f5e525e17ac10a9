"""transport.wake: which batches notify inside their own commit."""

from __future__ import annotations

import copy

import pytest

from pgvpn_agent import config
from pgvpn_agent.sender import QUIET, SMALL, wakes_in_commit
from tests.unit.test_config import BASE, with_


def test_auto_notifies_in_commit_only_for_what_it_waited_for_outside_a_flow():
    # back from idle (a ping, a keystroke, a request): woken sooner, small rows carried
    assert wakes_in_commit("auto", from_idle=True)
    # small datagrams in quick succession (a stream, a request/response exchange) too
    assert wakes_in_commit("auto", from_idle=True, since_batch=QUIET / 10, size=SMALL)
    # a big batch a moment after one before it, waited for: a paced flow's next burst
    assert wakes_in_commit("auto", from_idle=True, since_batch=QUIET, size=SMALL + 1)
    assert not wakes_in_commit("auto", from_idle=True, since_batch=QUIET / 10, size=SMALL + 1)
    # packets already waiting when the last batch was done: off the notification lock
    assert not wakes_in_commit("auto", from_idle=False)
    # anything just after the receiver wrote a big page: the flow's ACKs
    assert not wakes_in_commit("auto", from_idle=True, since_bulk=QUIET / 10)
    assert wakes_in_commit("auto", from_idle=True, since_bulk=QUIET)


@pytest.mark.parametrize("quiet", [0.0, 10.0])
@pytest.mark.parametrize("from_idle", [False, True])
def test_the_fixed_settings_ignore_it(from_idle, quiet):
    assert wakes_in_commit("in_commit", from_idle, quiet, SMALL * 10, quiet)
    assert not wakes_in_commit("after_commit", from_idle, quiet, 0, quiet)


def test_auto_is_the_default_and_other_values_are_refused():
    assert config.parse(copy.deepcopy(BASE)).transport.wake == "auto"
    assert config.parse(with_(transport__wake="in_commit")).transport.wake == "in_commit"
    with pytest.raises(config.ConfigError, match=r"transport\.wake: 'later' is not one of auto"):
        config.parse(with_(transport__wake="later"))
