"""transport.wake: which batches notify inside their own commit."""

from __future__ import annotations

import copy

import pytest

from pgvpn_agent import config
from pgvpn_agent.sender import wakes_in_commit
from tests.unit.test_config import BASE, with_


def test_auto_notifies_in_commit_only_for_a_batch_it_waited_for():
    # back from idle (a ping, a keystroke, a request): one round trip sooner
    assert wakes_in_commit("auto", from_idle=True)
    # packets already waiting when the last batch was done: off the notification lock
    assert not wakes_in_commit("auto", from_idle=False)


@pytest.mark.parametrize("from_idle", [False, True])
def test_the_fixed_settings_ignore_it(from_idle):
    assert wakes_in_commit("in_commit", from_idle)
    assert not wakes_in_commit("after_commit", from_idle)


def test_auto_is_the_default_and_other_values_are_refused():
    assert config.parse(copy.deepcopy(BASE)).transport.wake == "auto"
    assert config.parse(with_(transport__wake="in_commit")).transport.wake == "in_commit"
    with pytest.raises(config.ConfigError, match=r"transport\.wake: 'later' is not one of auto"):
        config.parse(with_(transport__wake="later"))
