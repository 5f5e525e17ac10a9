"""Payload encryption at rest: whoever reads the log without the keys sees headers, not contents.

Every pair of peers shares 256-bit keys (generated and distributed by Ansible). The sender
seals each packet with AES-GCM-SIV before it becomes a row; only the receiving peer can open it.
The header fields are destructured before sealing, so the log stays queryable by address, port
and protocol; the sealed payload is authenticated together with its link and sequence number,
so a database administrator can neither read a packet nor move one to another link or position
without the receiver noticing.

Stored layout: key id (1 byte) | nonce (12 bytes) | ciphertext and tag (len(packet) + 16).
The key id makes rotation possible: a peer seals with its newest key and opens with any it
holds. Nonces are random; GCM-SIV stays safe if two ever repeat (it then only reveals that
two packets were identical), which a counter could not promise across restarts and resyncs.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from .config import Config, ConfigError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES
_CONTEXT = b"pgvpn/seal/1"


class KeysFileError(ConfigError):
    """A keys file problem, phrased for the operator who has to fix it."""


class Unsealable(ValueError):
    """A stored payload that this peer cannot open: unknown key id, tampered or truncated."""


def new_key() -> str:
    """A fresh key, base64 as it goes into a keys file."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def _aad(src: str, dst: str, seq: int) -> bytes:
    """What a sealed payload is bound to: its link (both ends) and its place on it."""
    s, d = src.encode(), dst.encode()
    return _CONTEXT + struct.pack("!qHH", seq, len(s), len(d)) + s + d


@dataclass(frozen=True)
class LinkKeys:
    """The keys this peer shares with one other peer, by id; `seal_id` (else the highest) seals.

    Rotation is two-phase: every peer first gets the new id (all ids open), and only then do
    senders seal with it (`seal = N` in the keys file) — a receiver never meets an id it lacks.
    """

    keys: Mapping[int, AESGCMSIV]
    seal_id: int | None = None

    @property
    def current(self) -> int:
        return max(self.keys) if self.seal_id is None else self.seal_id


class Sealer:
    """Seals packets to, and opens packets from, the peers named in a keys file."""

    def __init__(self, me: str, links: Mapping[str, LinkKeys]) -> None:
        self.me = me
        self.links = dict(links)

    def seal(self, dst: str, seq: int, packet: bytes) -> bytes:
        link = self.links[dst]
        key_id = link.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = link.keys[key_id].encrypt(nonce, packet, _aad(self.me, dst, seq))
        return bytes((key_id,)) + nonce + sealed

    def open(self, src: str, seq: int, stored: bytes) -> bytes:
        link = self.links.get(src)
        if link is None:
            raise Unsealable(f"no key shared with peer {src}")
        if len(stored) < OVERHEAD:
            raise Unsealable(f"{len(stored)} bytes is shorter than a sealed packet")
        key = link.keys.get(stored[0])
        if key is None:
            raise Unsealable(f"key id {stored[0]} from peer {src} is not in the keys file")
        try:
            return key.decrypt(stored[1:1 + NONCE_BYTES], stored[1 + NONCE_BYTES:],
                               _aad(src, self.me, seq))
        except InvalidTag:
            raise Unsealable(f"packet {seq} from peer {src} failed authentication") from None


def for_config(config: Config) -> Sealer | None:
    """The agent's sealer, or None when encryption at rest is off."""
    if config.keys_file is None:
        return None
    return load(config.keys_file, config.peer, [p.name for p in config.peers])


def load(path: str | os.PathLike[str], me: str, peers: list[str]) -> Sealer:
    """Read a keys file: the id senders seal with (optional: else the highest), and one table
    per other peer, key id = key.

        seal = 1
        [keys.peer2]
        1 = "base64 of 32 random bytes, or 64 hex digits"
    """
    where = f"encryption.keys_file {path}"
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise KeysFileError(f"{where}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{where}: not valid TOML: {exc}") from exc
    extra = sorted(set(raw) - {"keys", "seal"})
    if extra:
        raise KeysFileError(f"{where}: unknown key {extra[0]!r} (known: keys, seal)")
    seal_id = raw.get("seal")
    if seal_id is not None and (isinstance(seal_id, bool) or not isinstance(seal_id, int)
                                or not 0 <= seal_id <= 255):
        raise KeysFileError(f"{where}: seal: the key id senders seal with, an integer 0-255")
    tables = raw.get("keys")
    if not isinstance(tables, dict):
        raise KeysFileError(f"{where}: no [keys.<peer>] tables")
    unknown = sorted(set(tables) - set(peers))
    if unknown:
        raise KeysFileError(f"{where}: keys for unknown peers {unknown} (peers: {sorted(peers)})")
    missing = sorted(set(peers) - set(tables) - {me})
    if missing:
        raise KeysFileError(f"{where}: no key shared with {missing}; every pair of peers needs one")
    links = {peer: _link(where, peer, table, seal_id) for peer, table in tables.items()}
    return Sealer(me, links)


def _link(where: str, peer: str, table: object, seal_id: int | None) -> LinkKeys:
    if not isinstance(table, dict) or not table:
        raise KeysFileError(f"{where}: [keys.{peer}] must map key ids to base64 keys")
    keys: dict[int, AESGCMSIV] = {}
    for key_id, value in table.items():
        if not key_id.isdigit() or not 0 <= int(key_id) <= 255:
            raise KeysFileError(f"{where}: keys.{peer}.{key_id}: key ids are integers 0-255")
        key = _decode(value)
        if len(key) != KEY_BYTES:
            raise KeysFileError(
                f"{where}: keys.{peer}.{key_id}: expected {KEY_BYTES} bytes in base64 or "
                f"{2 * KEY_BYTES} hex digits (generate one with `pgvpn keygen`)")
        keys[int(key_id)] = AESGCMSIV(key)
    if seal_id is not None and seal_id not in keys:
        raise KeysFileError(f"{where}: seal = {seal_id}, but [keys.{peer}] has no key {seal_id}")
    return LinkKeys(keys, seal_id)


def _decode(value: object) -> bytes:
    """Base64 (`pgvpn keygen`) or hex (what Ansible's password lookup makes)."""
    if not isinstance(value, str):
        return b""
    try:
        if len(value) == 2 * KEY_BYTES:
            return bytes.fromhex(value)
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b""
