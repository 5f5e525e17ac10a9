"""What this sender saw committed on each link, kept by the agent as well as by the database.

A database that loses commits — restored from a backup, failed over to a standby that lacked
them, commits made asynchronous by a role or database setting — hands the sender back a tx_seq
below what it saw committed. Continuing from there would reuse sequence numbers its receivers
have already passed, and they would skip the new packets. The sender compares, says so loudly,
and moves the link past everything it ever saw committed: receivers see a hole (counted), never
a skip or a repeat. The marks live in memory and, so that a restart of the agent does not forget
them, in a small file rewritten at most once a second (`transport.state_file`) by a thread of
its own: the write is synced twice (file and directory), and on a slow disk that took
milliseconds from the sender's path once a second.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
WRITE_EVERY = 1.0


class HighWater:
    """Per remote peer (by name: ids are the database's, and it is the thing that may go back)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.marks: dict[str, int] = {}
        self.dirty = False
        self.written_at = 0.0
        self._writing = threading.Lock()  # one write of the file at a time
        self._due = threading.Event()
        self._closed = False
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None
        if path is not None:
            try:
                raw = json.loads(path.read_text())
                self.marks = {str(k): int(v) for k, v in raw.items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                log.warning("sender: cannot read %s (%s); starting without the sequence marks it "
                            "kept", path, exc)

    def seen(self, peer: str, seq: int) -> None:
        if seq > self.marks.get(peer, 0):
            self.marks[peer] = seq
            self.dirty = True

    def behind(self, committed: dict[str, int]) -> dict[str, int]:
        """Links whose database tx_seq is below what this sender saw committed: peer -> mark."""
        return {peer: mark for peer, mark in self.marks.items()
                if peer in committed and committed[peer] < mark}

    def flush(self, force: bool = False) -> None:
        """Write the marks if they changed, at most once per WRITE_EVERY, in the writer thread;
        `force`: now, in the caller's thread, before it goes on (a mark that must survive a
        crash that could follow)."""
        if self._failure is not None:
            raise RuntimeError("the sequence marks' writer failed") from self._failure
        if self.path is None or not self.dirty:
            return
        if force:
            self._write()
            return
        now = time.monotonic()
        if now - self.written_at < WRITE_EVERY:
            return
        self.written_at = now
        if self._writer is None:
            self._writer = threading.Thread(target=self._run, name="highwater", daemon=True)
            self._writer.start()
        self._due.set()

    def close(self) -> None:
        """Stop the writer thread (after a last `flush(force=True)`)."""
        self._closed = True
        self._due.set()
        if self._writer is not None:
            self._writer.join()

    def _run(self) -> None:
        try:
            while True:
                self._due.wait()
                self._due.clear()
                if self._closed:
                    return
                self._write()
        except BaseException as exc:  # raised in the sender's thread at its next flush
            self._failure = exc

    def _write(self) -> None:
        assert self.path is not None
        with self._writing:
            self.dirty = False  # before the copy: a mark seen meanwhile makes it dirty again
            marks = dict(self.marks)
            try:
                write_json(self.path, marks)
            except OSError as exc:
                self.dirty = True
                log.warning("sender: cannot write %s (%s); a restart would forget the sequence "
                            "marks (tried again in %.0fs)", self.path, exc, WRITE_EVERY)


def write_json(path: Path, value: object) -> None:
    """Replace `path` with `value` as JSON, atomically and synced (the rename too)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class ExitCursors:
    """The receiver's cursors when it stops and cannot commit them (the database is away).

    They would be lost with the process and the restart would deliver those packets again; they
    go to a file beside the sender's marks instead (`<state_file stem>.cursors.json`), read at
    the next connect, committed, and the file removed. By peer name, like the marks.
    """

    def __init__(self, state_file: Path | None) -> None:
        self.path = (None if state_file is None
                     else state_file.with_name(state_file.stem + ".cursors.json"))

    def load(self) -> dict[str, int]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {str(k): int(v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("receiver: cannot read %s (%s); packets delivered before the last stop "
                        "may be delivered again", self.path, exc)
            return {}

    def save(self, cursors: dict[str, int]) -> bool:
        if self.path is None or not cursors:
            return False
        try:
            write_json(self.path, cursors)
        except OSError as exc:
            log.warning("receiver: cannot write %s (%s)", self.path, exc)
            return False
        return True

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
