"""Open the box small unsealed rows ride in (schema v15), with the link's carry key.

send_batch() builds it with pgcrypto: a random IV, the rows' frames under AES-256-CBC with the
first half of the key, then HMAC-SHA-256 under the second half over "src:last:dst:timeline:",
the IV and the ciphertext. Only the receiving peer may read the key (pgvpn.carry_key). The tag
is checked first, in constant time: a text someone else NOTIFYed, one moved to another link or
position, or one recorded before a failover (the server's timeline) opens to nothing and the
receiver reads the table instead.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 64
IV_BYTES = 16
TAG_BYTES = 32
BLOCK_BYTES = 16
# a virtio_net_hdr, as send_batch() allows (tun.VNET_SIZE)
MAX_OFFLOAD = 12

# a carried row: its payload and its offload header (None: none), as carried.Carried
Row = tuple[bytes, bytes | None]


def header(src: int, last: int, dst: int, timeline: int) -> bytes:
    """What the tag covers besides the box: the link, the position of its last row, and the
    history of the log it was written in."""
    return f"{src}:{last}:{dst}:{timeline}:".encode()


def open_box(key: bytes, src: int, last: int, dst: int, timeline: int,
             box: bytes) -> tuple[Row, ...] | None:
    """The rows of a box for link src -> dst ending at `last`, written on `timeline`; None if
    it does not verify."""
    if (len(key) != KEY_BYTES or len(box) < IV_BYTES + BLOCK_BYTES + TAG_BYTES
            or (len(box) - IV_BYTES - TAG_BYTES) % BLOCK_BYTES):
        return None
    body, tag = box[:-TAG_BYTES], box[-TAG_BYTES:]
    expected = hmac.new(key[32:], header(src, last, dst, timeline) + body,
                        hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        return None
    decryptor = Cipher(algorithms.AES(key[:32]), modes.CBC(body[:IV_BYTES])).decryptor()
    unpadder = padding.PKCS7(BLOCK_BYTES * 8).unpadder()
    try:
        frames = unpadder.update(decryptor.update(body[IV_BYTES:]) + decryptor.finalize())
        frames += unpadder.finalize()
    except ValueError:
        return None
    return parse_frames(frames)


def parse_frames(data: bytes) -> tuple[Row, ...] | None:
    """Frames: payload length and offload header length plus one (two bytes each, big-endian;
    0: no header, so that an empty one stays empty and is refused as the table's would be),
    then the payload and the header. None unless they are exactly that."""
    rows: list[Row] = []
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            return None
        size = int.from_bytes(data[at:at + 2], "big")
        marked = int.from_bytes(data[at + 2:at + 4], "big")
        extra = max(marked - 1, 0)
        at += 4
        if size == 0 or extra > MAX_OFFLOAD or at + size + extra > len(data):
            return None
        rows.append((data[at:at + size], data[at + size:at + size + extra] if marked else None))
        at += size + extra
    return tuple(rows) or None
