"""What this sender saw committed on each link, kept by the agent as well as by the database.

A database that loses commits — restored from a backup, failed over to a standby that lacked
them, commits made asynchronous by a role or database setting — hands the sender back a tx_seq
below what it saw committed. Continuing from there would reuse sequence numbers its receivers
have already passed, and they would skip the new packets. The sender compares, says so loudly,
and moves the link past everything it ever saw committed: receivers see a hole (counted), never
a skip or a repeat. The marks live in memory and, so that a restart of the agent does not forget
them, in a small file rewritten at most once a second (`transport.state_file`).
"""

from __future__ import annotations

import json
import logging
import os
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
        """Write the marks (atomically, synced) if they changed, at most once per WRITE_EVERY."""
        if self.path is None or not self.dirty:
            return
        now = time.monotonic()
        if not force and now - self.written_at < WRITE_EVERY:
            return
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        self.written_at = now
        try:
            with open(tmp, "w") as f:
                json.dump(self.marks, f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a crash
            finally:
                os.close(directory)
        except OSError as exc:
            log.warning("sender: cannot write %s (%s); a restart would forget the sequence "
                        "marks (tried again in %.0fs)", self.path, exc, WRITE_EVERY)
            return
        self.dirty = False
