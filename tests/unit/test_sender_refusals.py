"""How the sender treats a batch the database refuses: by the SQLSTATE, never by the message.

Disk full and quota drop the batch (it was not logged), count it under its reason and pace the
retries; a full NOTIFY queue sends the same batch again without wake-ups; other errors are the
caller's. The database side of each is tested in tests/integration (test_disk_full.py,
test_peer_control.py); here the decisions alone.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import psycopg
import pytest

from pgvpn_agent import config, metrics
from pgvpn_agent.sender import Sender
from pgvpn_agent.stopping import Stop
from tests.unit.test_config import BASE


class Conn:
    closed = False


def sender() -> Sender:
    s = Sender(config.parse(copy.deepcopy(BASE)), tun=Any, stop=Stop())  # type: ignore[arg-type]
    s.conn = Conn()  # type: ignore[assignment]
    s.pending = [(time.time(), b"\0" * 60)] * 3
    return s


def error(sqlstate: str) -> psycopg.Error:
    return psycopg.errors.lookup(sqlstate)("refused")


@pytest.mark.parametrize("sqlstate, reason", [("53100", "disk_full"), ("PV002", "quota")])
def test_disk_full_and_quota_drop_the_batch_and_pace_retries(sqlstate: str, reason: str) -> None:
    s = sender()
    before = metrics.DROPPED.labels(reason)._value.get()
    exc = error(sqlstate) if sqlstate != "PV002" else _custom("PV002")
    assert s._refused(exc)
    assert s.pending == [] and s.refused_for == reason
    assert metrics.DROPPED.labels(reason)._value.get() == before + 3
    assert not s.no_space.due(), "the next try waits"


def test_a_full_notify_queue_resends_unnotified() -> None:
    s = sender()
    assert s._queue_full(error("54000"))
    assert len(s.pending) == 3, "the batch was not logged: it goes again"
    assert s.notify_again_at > time.monotonic() + 5


def test_other_errors_are_the_callers() -> None:
    s = sender()
    for exc in (error("42501"), error("23505"), _custom("PV003")):
        assert not s._refused(exc) and not s._queue_full(exc)
    assert len(s.pending) == 3


def _custom(sqlstate: str) -> psycopg.Error:
    """A RAISE ... USING ERRCODE of the schema's own (PV...): psycopg has no class for it."""
    class Raised(psycopg.DatabaseError):
        pass
    Raised.sqlstate = sqlstate  # type: ignore[attr-defined,misc]
    return Raised("refused")
