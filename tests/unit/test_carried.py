"""Notification texts (schema v14, v15): what a receiver takes from them, and when it reads the
table."""

from __future__ import annotations

import base64

import pytest

from pgvpn_agent import carried


def b64(*rows: bytes) -> str:
    return ",".join(base64.b64encode(r).decode() for r in rows)


def rows(*payloads: bytes) -> tuple[carried.Carried, ...]:
    return tuple((p, None) for p in payloads)


def test_a_plain_wake_up_carries_nothing() -> None:
    assert carried.parse("3:17") == carried.Note(3, 17, ())


def test_rows_come_last_first_order_kept() -> None:
    note = carried.parse(f"3:17:{b64(b'a', b'b')}")
    assert note == carried.Note(3, 17, rows(b"a", b"b"))


def test_an_offload_header_follows_its_payload() -> None:
    header = bytes(10)
    note = carried.parse(f"3:17:{b64(b'a')}.{b64(header)},{b64(b'b')}")
    assert note == carried.Note(3, 17, ((b"a", header), (b"b", None)))


@pytest.mark.parametrize("text", [
    "", ":", "3", "3:", ":17", "x:17", "3:x", "-3:17", "3:-17", "3:0", "0:17", "40000:1",
    "3:99999999999999999999", " 3:17", "3:17 ", "3:17:", "3:17:,", "3:17:!!!", "3:17:YQ=,",
    "3:17:YQ", f"3:1:{b64(b'a', b'b')}", "3:17:YQ==.", "3:17:.YQ==", "3:17:YQ==.YQ==.YQ==",
    "\uff13:17", "3:17:" + "A" * carried.MAX_TEXT,
])
def test_anything_send_batch_does_not_write_is_refused(text: str) -> None:
    assert carried.parse(text) is None


def test_carried_rows_continue_the_cursor() -> None:
    notes = [f"3:12:{b64(b'11', b'12')}", f"5:2:{b64(b'1', b'2')}", f"3:13:{b64(b'13')}"]
    assert carried.pending(notes, {3: 10, 5: 0}) == [
        (3, 11, (b"11", None)), (3, 12, (b"12", None)), (5, 1, (b"1", None)),
        (5, 2, (b"2", None)), (3, 13, (b"13", None))]


def test_rows_a_fetch_delivered_already_are_skipped() -> None:
    cursor = {3: 11}
    assert carried.pending([f"3:12:{b64(b'11', b'12')}"], cursor) == [(3, 12, (b"12", None))]
    assert carried.pending([f"3:12:{b64(b'11', b'12')}", "3:9"], {3: 12}) == []
    assert cursor == {3: 11}, "the receiver's cursor moves only once rows are written"


@pytest.mark.parametrize("notes", [
    ["3:12"],  # a batch too big, or not sealed: its rows are in the table only
    [f"3:13:{b64(b'13')}"],  # 11 and 12 are missing: a notification lost, a poll not yet done
    [f"3:12:{b64(b'11', b'12')}", "3:14"],
    [f"3:12:{b64(b'11', b'12')}", "junk"],
])
def test_the_table_is_read_on_a_gap_or_anything_unknown(notes: list[str]) -> None:
    assert carried.pending(notes, {3: 10}) is None


def test_links_the_receiver_does_not_follow_are_not_its_own() -> None:
    assert carried.pending([f"9:2:{b64(b'1', b'2')}"], {3: 10}) == []


def test_the_links_a_wake_up_names() -> None:
    assert carried.links(["3:12", f"5:2:{b64(b'1')}", "3:13"]) == {3, 5}
    assert carried.links([]) == set()
    assert carried.links(["3:12", "junk"]) is None, "an unknown text: every link is read"
