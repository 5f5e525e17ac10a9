"""Sealed payloads: only the link's two peers read them, and any tampering is detected."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from hypothesis import given
from hypothesis import strategies as st

from pgvpn_agent import seal
from pgvpn_agent.config import ConfigError

PEERS = ["peer1", "peer2", "peer3"]


def keys_file(tmp_path: Path, me: str, table: dict[str, dict[int, str]]) -> Path:
    lines = []
    for peer, keys in table.items():
        lines.append(f"[keys.{peer}]")
        lines += [f'{key_id} = "{key}"' for key_id, key in keys.items()]
    path = tmp_path / f"{me}.keys"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[seal.Sealer, seal.Sealer, seal.Sealer]:
    k12, k13, k23 = seal.new_key(), seal.new_key(), seal.new_key()
    p1 = seal.load(keys_file(tmp_path, "peer1", {"peer2": {1: k12}, "peer3": {1: k13}}),
                   "peer1", PEERS)
    p2 = seal.load(keys_file(tmp_path, "peer2", {"peer1": {1: k12}, "peer3": {1: k23}}),
                   "peer2", PEERS)
    p3 = seal.load(keys_file(tmp_path, "peer3", {"peer1": {1: k13}, "peer2": {1: k23}}),
                   "peer3", PEERS)
    return p1, p2, p3


KEY = AESGCMSIV(AESGCMSIV.generate_key(256))
A = seal.Sealer("a", {"b": seal.LinkKeys({7: KEY})})
B = seal.Sealer("b", {"a": seal.LinkKeys({7: KEY})})


@given(packet=st.binary(min_size=0, max_size=9000), seq=st.integers(1, 2**62))
def test_the_receiver_opens_what_the_sender_sealed(packet: bytes, seq: int) -> None:
    stored = A.seal("b", seq, packet)
    assert len(stored) == len(packet) + seal.OVERHEAD
    assert stored[0] == 7
    assert B.open("a", seq, stored) == packet


def test_stored_bytes_hide_the_packet_and_never_repeat(pair) -> None:
    p1, _, _ = pair
    packet = b"E\x00" + b"secret payload " * 20
    a, b = p1.seal("peer2", 1, packet), p1.seal("peer2", 1, packet)
    assert b"secret" not in a
    assert a != b, "a fresh nonce per packet"


def test_a_third_peer_cannot_open_a_link_it_is_not_on(pair) -> None:
    p1, _, p3 = pair
    stored = p1.seal("peer2", 5, b"E" * 40)
    with pytest.raises(seal.Unsealable, match="failed authentication"):
        p3.open("peer1", 5, stored)


@pytest.mark.parametrize("change", ["seq", "src", "bit", "truncate", "key id"])
def test_tampering_is_detected(pair, change: str) -> None:
    p1, p2, _ = pair
    stored = bytearray(p1.seal("peer2", 5, b"E" * 40))
    src, seq = "peer1", 5
    if change == "seq":
        seq = 6
    elif change == "src":
        src = "peer3"
    elif change == "bit":
        stored[20] ^= 1
    elif change == "truncate":
        del stored[seal.OVERHEAD - 1:]
    else:
        stored[0] = 9
    with pytest.raises(seal.Unsealable):
        p2.open(src, seq, bytes(stored))


def test_rotation_seals_with_the_newest_key_and_opens_with_any(tmp_path: Path) -> None:
    old, new = seal.new_key(), seal.new_key()
    a_old = seal.load(keys_file(tmp_path, "a", {"b": {1: old}}), "a", ["a", "b"])
    a_new = seal.load(keys_file(tmp_path, "a", {"b": {1: old, 2: new}}), "a", ["a", "b"])
    b = seal.load(keys_file(tmp_path, "b", {"a": {1: old, 2: new}}), "b", ["a", "b"])
    assert a_new.seal("b", 1, b"x")[0] == 2
    assert b.open("a", 1, a_old.seal("b", 1, b"x")) == b"x"
    assert b.open("a", 2, a_new.seal("b", 2, b"y")) == b"y"


def test_two_phase_rotation_seals_with_the_named_id(tmp_path: Path) -> None:
    """Phase one: every peer holds id 2, senders still seal with 1 (`seal = 1`), so a receiver
    that has not been updated yet opens everything; phase two switches the seal."""
    old, new = seal.new_key(), seal.new_key()
    path = tmp_path / "a.keys"
    path.write_text(f'seal = 1\n[keys.b]\n1 = "{old}"\n2 = "{new}"\n')
    a_phase1 = seal.load(path, "a", ["a", "b"])
    b_before = seal.load(keys_file(tmp_path, "b", {"a": {1: old}}), "b", ["a", "b"])
    assert b_before.open("a", 1, a_phase1.seal("b", 1, b"x")) == b"x"
    path.write_text(f'seal = 2\n[keys.b]\n1 = "{old}"\n2 = "{new}"\n')
    assert seal.load(path, "a", ["a", "b"]).seal("b", 2, b"y")[0] == 2


@pytest.mark.parametrize(("content", "message"), [
    ("", r"no \[keys.<peer>\] tables"),
    ("seal = 2\n[keys.peer2]\n1 = \"{k}\"\n[keys.peer3]\n1 = \"{k}\"\n",
     r"seal = 2, but \[keys.peer2\] has no key 2"),
    ("seal = true\n[keys.peer2]\n1 = \"{k}\"\n", r"seal: the key id senders seal with"),
    ("sael = 1\n[keys.peer2]\n1 = \"{k}\"\n", r"unknown key 'sael'"),
    ("[keys.peer2]\n1 = \"{k}\"\n", r"no key shared with \['peer3'\]"),
    ("[keys.peer2]\n1 = \"{k}\"\n[keys.peer3]\n1 = \"{k}\"\n[keys.peer9]\n1 = \"{k}\"\n",
     r"unknown peers \['peer9'\]"),
    ("[keys.peer2]\n1 = \"{k}\"\n[keys.peer3]\n1 = \"c2hvcnQ=\"\n",
     r"keys.peer3.1: expected 32 bytes in base64 or 64 hex digits"),
    ("[keys.peer2]\n1 = \"{k}\"\n[keys.peer3]\nx = \"{k}\"\n", r"keys.peer3.x: key ids"),
    ("[keys.peer2]\n1 = \"{k}\"\n[keys.peer3]\n300 = \"{k}\"\n", r"keys.peer3.300: key ids"),
    ("[keys.peer2\n", "not valid TOML"),
])
def test_bad_keys_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "peer1.keys"
    path.write_text(content.replace("{k}", seal.new_key()))
    with pytest.raises(ConfigError, match=message):
        seal.load(path, "peer1", PEERS)


def test_hex_keys_are_accepted(tmp_path: Path) -> None:
    hex_key = "0123456789abcdefABCDEF" * 2 + "00112233445566778899"
    a = seal.load(keys_file(tmp_path, "a", {"b": {1: hex_key}}), "a", ["a", "b"])
    b = seal.load(keys_file(tmp_path, "b", {"a": {1: hex_key}}), "b", ["a", "b"])
    assert b.open("a", 3, a.seal("b", 3, b"packet")) == b"packet"


def test_a_missing_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        seal.load(tmp_path / "nope", "peer1", PEERS)
