"""Boxed rows (schema v15): what a receiver opens with its link's carry key, and what not.

The boxes here are made as send_batch() makes them with pgcrypto (AES-256-CBC, PKCS padding,
then HMAC-SHA-256 over "src:last:dst:timeline:", IV and ciphertext); test_carry shows the database's
own boxes open the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pgvpn_agent import carried, carrybox

KEY = bytes(range(64))


def frames(*rows: tuple[bytes, bytes | None]) -> bytes:
    """Payload length, header length plus one (0: none), payload, header."""
    return b"".join(len(p).to_bytes(2, "big") + (0 if o is None else len(o) + 1).to_bytes(2, "big")
                    + p + (o or b"") for p, o in rows)


def box(data: bytes, src: int = 3, last: int = 17, dst: int = 5, timeline: int = 1,
        key: bytes = KEY, iv: bytes | None = None) -> bytes:
    iv = os.urandom(16) if iv is None else iv
    padder = padding.PKCS7(128).padder()
    plain = padder.update(data) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key[:32]), modes.CBC(iv)).encryptor()
    body = iv + encryptor.update(plain) + encryptor.finalize()
    return body + hmac.new(key[32:], f"{src}:{last}:{dst}:{timeline}:".encode() + body,
                           hashlib.sha256).digest()


PING = bytes.fromhex("45000054") + os.urandom(80)
HEADER = bytes(10)


def test_a_box_opens_to_its_rows_in_order() -> None:
    rows = ((PING, None), (b"\x60" + bytes(60), HEADER))
    assert carrybox.open_box(KEY, 3, 17, 5, 1, box(frames(*rows))) == rows


def test_an_empty_offload_header_stays_empty() -> None:
    """Not "no header": the receiver refuses it, as it refuses the same row from the table."""
    assert carrybox.open_box(KEY, 3, 17, 5, 1, box(frames((PING, b"")))) == ((PING, b""),)


@pytest.mark.parametrize("where", ["src", "last", "dst", "timeline"])
def test_a_box_moved_to_another_link_position_or_history_does_not_open(where: str) -> None:
    """The tag covers the link (both ends), the position and the server's timeline: a replay
    elsewhere, or after a failover that lost the rows it carried, is refused."""
    good = box(frames((PING, None)))
    at = {"src": 3, "last": 17, "dst": 5, "timeline": 1}
    at[where] += 1
    assert carrybox.open_box(KEY, at["src"], at["last"], at["dst"], at["timeline"],
                             good) is None


def test_a_box_under_another_key_does_not_open() -> None:
    assert carrybox.open_box(KEY, 3, 17, 5, 1, box(frames((PING, None)), key=os.urandom(64))) \
        is None


@pytest.mark.parametrize("at", [0, 15, 16, 40, -33, -1])
def test_a_flipped_bit_anywhere_does_not_open(at: int) -> None:
    """IV, ciphertext or tag: the tag is checked before anything is decrypted."""
    good = bytearray(box(frames((PING, None))))
    good[at] ^= 0x01
    assert carrybox.open_box(KEY, 3, 17, 5, 1, bytes(good)) is None


@pytest.mark.parametrize("size", [0, 16, 47, 48, 63, 81])
def test_a_box_of_the_wrong_size_does_not_open(size: int) -> None:
    assert carrybox.open_box(KEY, 3, 17, 5, 1, os.urandom(size)) is None


def test_a_key_of_the_wrong_size_opens_nothing() -> None:
    assert carrybox.open_box(KEY[:32], 3, 17, 5, 1, box(frames((PING, None)))) is None


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\x00\x05\x00", b"\x00\x00\x00\x00",  # nothing, cut short, an empty payload
    b"\x00\x02\x00\x00a",  # shorter than it says
    b"\x00\x01\x00\x0ea" + bytes(13),  # an offload header longer than a virtio_net_hdr
    frames((b"a", None)) + b"\x00",  # trailing bytes
])
def test_frames_that_are_not_exactly_rows_are_refused(data: bytes) -> None:
    assert carrybox.parse_frames(data) is None
    # and sealed in a box with a valid tag (only the database could make one): still refused
    assert carrybox.open_box(KEY, 3, 17, 5, 1, box(data)) is None


def note_text(src: int, last: int, data: bytes) -> str:
    return f"{src}:{last};" + base64.b64encode(data).decode()


def unbox_with(key: bytes, dst: int = 5) -> carried.Unbox:
    def unbox(note: carried.Note) -> tuple[carried.Carried, ...] | None:
        assert note.box is not None
        return carrybox.open_box(key, note.src, note.last, dst, 1, note.box)
    return unbox


def test_a_boxed_note_continues_the_cursor() -> None:
    text = note_text(3, 17, box(frames((b"p16", None), (b"p17", None))))
    assert carried.parse(text) == carried.Note(3, 17, (), base64.b64decode(text.split(";")[1]))
    assert carried.pending([text], {3: 15}, unbox_with(KEY)) == [
        (3, 16, (b"p16", None)), (3, 17, (b"p17", None))]
    # delivered already: skipped without opening it; a gap: the table
    assert carried.pending([text], {3: 17}, unbox_with(os.urandom(64))) == []
    assert carried.pending([text], {3: 14}, unbox_with(KEY)) is None


def test_a_receiver_takes_only_the_kind_its_pairs_send() -> None:
    """Sealed pairs take sealed rows and never boxes; unsealed ones boxes and never rows."""
    boxed = note_text(3, 17, box(frames((b"p17", None))))
    sealed = "3:17:" + base64.b64encode(b"sealed").decode()
    assert carried.pending([boxed], {3: 16}) is None
    assert carried.pending([sealed], {3: 16}, unbox_with(KEY)) is None
    assert carried.pending([sealed], {3: 16}) == [(3, 17, (b"sealed", None))]


@pytest.mark.parametrize("text", ["3:17;", "3:17;!!", "3:17;YQ", "3:17;YQ==,YQ==",
                                  "3:17:YQ==;YQ=="])
def test_a_box_that_is_not_base64_is_refused(text: str) -> None:
    assert carried.parse(text) is None


def test_a_box_with_more_rows_than_its_position_allows_is_refused() -> None:
    text = note_text(3, 2, box(frames((b"a", None), (b"b", None), (b"c", None)), last=2))
    assert carried.pending([text], {3: 0}, unbox_with(KEY)) is None
