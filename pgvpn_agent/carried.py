"""Rows a notification carries: small packets delivered without a fetch.

send_batch() builds, from the rows it logs when the batch is small: "src:last:row,row,..."
when all of a link's rows are sealed (schema v14; base64, sequence order; a row is its payload,
then '.' and its offload header when it has one); "src:last;box" when they are not and the link
has a carry key (v15: carrybox.py); "src:last" otherwise. The text is the database's, but anyone
who knows the channel may NOTIFY on it: nothing here is trusted beyond its shape, a carried row
is only delivered once it opens with the pair's key (sealed) or the link's carry key (boxed) for
its own link and sequence number, and anything else sends the receiver to the table.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import NamedTuple

# "src:last" and at most what NOTIFY holds (8000 bytes): bounds the work a forged text causes
MAX_TEXT = 8000
_TEXT = re.compile(r"([0-9]{1,5}):([0-9]{1,19})(?::([A-Za-z0-9+/=,.]+)|;([A-Za-z0-9+/=]+))?")


# a carried row: its payload (still sealed, if its pair seals) and its offload header (None: none)
Carried = tuple[bytes, bytes | None]


class Note(NamedTuple):
    src: int
    last: int
    rows: tuple[Carried, ...]  # sealed rows last - len + 1 .. last; () if none carried
    box: bytes | None = None  # unsealed rows, boxed (carrybox.py)


# A receiver whose pairs do not seal: the rows of a note's box, None if it does not open.
Unbox = Callable[[Note], tuple[Carried, ...] | None]


def parse(text: str) -> Note | None:
    """A notification's text, or None if it is not one send_batch() writes."""
    if len(text) > MAX_TEXT:
        return None
    match = _TEXT.fullmatch(text)
    if match is None:
        return None
    src, last, body = int(match[1]), int(match[2]), match[3]
    if not 0 < src < 1 << 15 or not 0 < last < 1 << 63:
        return None
    if match[4]:
        try:
            return Note(src, last, (), base64.b64decode(match[4], validate=True))
        except binascii.Error:
            return None
    if not body:
        return Note(src, last, ())
    try:
        rows = tuple(_row(r) for r in body.split(","))
    except (binascii.Error, ValueError):
        return None
    if len(rows) > last:
        return None
    return Note(src, last, rows)


def _row(text: str) -> Carried:
    payload, dot, offload = text.partition(".")
    row = base64.b64decode(payload, validate=True), (
        base64.b64decode(offload, validate=True) if dot else None)
    if not row[0] or row[1] == b"":
        raise ValueError("an empty payload or offload header")
    return row


def links(notes: list[str]) -> set[int] | None:
    """The links the notifications name (the only ones with new rows, but for a lost
    notification, which the receiver's periodic full fetch finds); None if a text is not one
    send_batch() writes: every link is read."""
    found = set()
    for text in notes:
        note = parse(text)
        if note is None:
            return None
        found.add(note.src)
    return found


def pending(notes: list[str], cursor: dict[int, int],
            unbox: Unbox | None = None) -> list[tuple[int, int, Carried]] | None:
    """The carried rows past `cursor`, in order: (src, seq, row); None when the table
    must be read (a notification without rows, a gap before its first row, an unknown text).

    `unbox`: this receiver's pairs do not seal, and it takes the rows of boxes only; None: they
    seal, and it takes sealed rows only. Links the cursor does not follow are not this
    receiver's to deliver (the fetch ignores them too). `cursor` is not changed.
    """
    at = dict(cursor)
    rows: list[tuple[int, int, Carried]] = []
    for text in notes:
        note = parse(text)
        if note is None:
            return None
        done = at.get(note.src)
        if done is None or note.last <= done:
            continue  # not followed, or delivered already (a fetch read it first)
        if unbox is None:
            carried = note.rows
        elif note.box is None:
            return None
        else:
            opened = unbox(note)
            if opened is None or len(opened) > note.last:
                return None
            carried = opened
        first = note.last - len(carried) + 1
        if not carried or first > done + 1:
            return None
        rows += [(note.src, first + i, r) for i, r in enumerate(carried) if first + i > done]
        at[note.src] = note.last
    return rows
