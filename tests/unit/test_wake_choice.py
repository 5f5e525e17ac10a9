"""transport.wake: which batches notify inside their own commit."""

from __future__ import annotations

import copy

import pytest

from pgvpn_agent import config
from pgvpn_agent.sender import BUSY_GAP, wakes_in_commit
from tests.unit.test_config import BASE, with_


def test_auto_notifies_in_commit_only_after_an_idle_spell():
    # back from idle (a ping, a keystroke, a request): one round trip sooner
    assert wakes_in_commit("auto", 1.0)
    assert wakes_in_commit("auto", BUSY_GAP)
    # batches that follow each other: off the cluster's notification lock
    assert not wakes_in_commit("auto", BUSY_GAP / 2)
    assert not wakes_in_commit("auto", 0.0)


@pytest.mark.parametrize("since", [0.0, 10.0])
def test_the_fixed_settings_ignore_the_gap(since):
    assert wakes_in_commit("in_commit", since)
    assert not wakes_in_commit("after_commit", since)


def test_auto_is_the_default_and_other_values_are_refused():
    assert config.parse(copy.deepcopy(BASE)).transport.wake == "auto"
    assert config.parse(with_(transport__wake="in_commit")).transport.wake == "in_commit"
    with pytest.raises(config.ConfigError, match=r"transport\.wake: 'later' is not one of auto"):
        config.parse(with_(transport__wake="later"))
