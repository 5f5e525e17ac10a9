"""The mesh filter's rules that no whole-playbook case shows well: pair key file names, their
migration from the earlier form, and revoked peers.

    python -m pytest molecule/preflight/test_mesh.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

PLUGIN = (Path(__file__).resolve().parents[2]
          / "roles" / "pgvpn_common" / "filter_plugins" / "pgvpn_mesh.py")


@pytest.fixture(scope="module")
def mesh() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pgvpn_mesh", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pair_names_cannot_collide(mesh: ModuleType) -> None:
    # The earlier form gave both pairs the same file.
    assert mesh.pgvpn_legacy_pair("a", "b--c") == mesh.pgvpn_legacy_pair("a--b", "c")
    assert mesh.pgvpn_pair("a", "b--c") != mesh.pgvpn_pair("a--b", "c")
    assert mesh.pgvpn_pair("peer2", "peer1") == mesh.pgvpn_pair("peer1", "peer2") == "peer1+peer2"


def test_legacy_pair_sorts_like_jinja(mesh: ModuleType) -> None:
    """Jinja's sort ignores case: the old files of mixed-case names are found."""
    assert mesh.pgvpn_legacy_pair("alpha", "Peer") == "alpha--Peer"


def test_key_moves_rename_every_id_and_skip_ambiguous_names(mesh: ModuleType) -> None:
    moves = mesh.pgvpn_pair_key_moves(["x", "y", "a", "b--c", "a--b", "c"], [1, 2], "/k")
    sources = [m["src"] for m in moves]
    assert {"src": "/k/x--y.1", "dest": "/k/x+y.1"} in moves
    assert {"src": "/k/x--y.2", "dest": "/k/x+y.2"} in moves
    # a--b--c.N could be the key of (a, b--c) or of (a--b, c): neither gets it.
    assert "/k/a--b--c.1" not in sources
    assert len(sources) == len(set(sources))


def _hostvars(**peers: dict[str, object]) -> dict[str, dict[str, object]]:
    return {host: {"pgvpn_peer_addresses": [f"10.77.0.{i}/24"], **extra}
            for i, (host, extra) in enumerate(peers.items(), start=1)}


def test_revoked_peers_leave_the_mesh(mesh: ModuleType) -> None:
    hostvars = _hostvars(p1={}, p2={}, gw={"pgvpn_peer_name": "branch-gw"})
    result = mesh.pgvpn_mesh(hostvars, list(hostvars), revoked=["branch-gw", "long-gone"])
    assert result["errors"] == []
    assert [p["name"] for p in result["peers"]] == ["p1", "p2"]
    assert result["revoked"] == [
        {"name": "branch-gw", "db_role": "pgvpn_branch_gw", "host": "gw"},
        {"name": "long-gone", "db_role": "pgvpn_long_gone", "host": None},
    ]


@pytest.mark.parametrize("name", ["agent", "Reader", "operator", "OWNER", "housekeeping",
                                  "metrics"])
def test_reserved_names_are_refused(mesh: ModuleType, name: str) -> None:
    hostvars = _hostvars(p1={}, p2={"pgvpn_peer_name": name})
    errors = mesh.pgvpn_mesh(hostvars, list(hostvars))["errors"]
    assert len(errors) == 1 and f"peer name {name!r} is reserved" in errors[0]
