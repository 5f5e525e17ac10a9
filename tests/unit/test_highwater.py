"""highwater.HighWater: the marks' file is written off the sender's path, and a forced write
is done before the caller goes on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pgvpn_agent import highwater
from pgvpn_agent.highwater import HighWater


def _wait_for(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def test_a_slow_write_does_not_hold_the_sender(tmp_path: Path, monkeypatch) -> None:
    real = highwater.write_json

    def slow(path: Path, value: object) -> None:
        time.sleep(0.5)  # a disk whose fsync takes that long
        real(path, value)

    monkeypatch.setattr(highwater, "write_json", slow)
    marks = HighWater(tmp_path / "marks.json")
    marks.seen("b", 7)
    started = time.monotonic()
    marks.flush()
    assert time.monotonic() - started < 0.1
    assert _wait_for(lambda: (tmp_path / "marks.json").exists())
    assert json.loads((tmp_path / "marks.json").read_text()) == {"b": 7}
    marks.close()


def test_a_forced_flush_is_on_disk_when_it_returns(tmp_path: Path) -> None:
    marks = HighWater(tmp_path / "marks.json")
    marks.seen("b", 3)
    marks.flush()  # the periodic write, in the writer thread
    marks.seen("b", 9)
    marks.flush(force=True)
    assert json.loads((tmp_path / "marks.json").read_text()) == {"b": 9}
    marks.close()
    assert HighWater(tmp_path / "marks.json").marks == {"b": 9}, "a restart reads them back"


def test_a_failed_write_is_tried_again(tmp_path: Path, caplog) -> None:
    where = tmp_path / "state"
    marks = HighWater(where / "marks.json")  # its directory does not exist yet
    marks.seen("b", 5)
    marks.flush(force=True)
    assert "cannot write" in caplog.text and marks.dirty
    where.mkdir()
    marks.written_at = 0.0  # WRITE_EVERY has passed
    marks.flush()
    assert _wait_for(lambda: (where / "marks.json").exists())
    assert json.loads((where / "marks.json").read_text()) == {"b": 5}
    marks.close()


def test_a_writer_that_breaks_fails_the_sender(tmp_path: Path, monkeypatch) -> None:
    def broken(path: Path, value: object) -> None:
        raise TypeError("not serialisable")

    monkeypatch.setattr(highwater, "write_json", broken)
    marks = HighWater(tmp_path / "marks.json")
    marks.seen("b", 1)
    marks.flush()
    assert _wait_for(lambda: marks._failure is not None)
    with pytest.raises(RuntimeError, match="writer failed"):
        marks.flush()
