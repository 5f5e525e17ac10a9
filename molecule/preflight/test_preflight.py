"""Preflight: a bad inventory fails before anything is deployed, with a message saying what to fix.

Runs the real site.yml in check mode, limited to the preflight tasks (tag pgvpn_preflight),
against inventories whose hosts are this machine (connection local). Facts come from a
prepared fact cache (smart gathering skips gathering when cached facts exist), so a case can
pretend to be another operating system and nothing depends on how this machine boots.

    python -m pytest molecule/preflight        # needs ansible-playbook on PATH or next to python
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("db", "peer1", "peer2", "peer3")


def _ansible(tool: str) -> str:
    beside = Path(sys.executable).with_name(tool)
    found = str(beside) if beside.exists() else shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} not found (install ansible in this Python's environment)")
    return found


def _inventory(peers: dict[str, dict[str, object]],
               all_vars: dict[str, object] | None = None) -> dict[str, object]:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    return {
        "all": {
            "vars": {**local, **(all_vars or {})},
            "children": {
                "pgvpn_db": {"hosts": {"db": {}}},
                "pgvpn_peers": {"hosts": peers},
            },
        }
    }


GOOD_PEERS: dict[str, dict[str, object]] = {
    "peer1": {"pgvpn_peer_addresses": ["10.77.0.1/24", "fd77::1/64"]},
    "peer2": {"pgvpn_peer_addresses": ["10.77.0.2/24", "fd77::2/64"],
              "pgvpn_peer_routes": ["192.168.20.0/24"]},
}

CASES = {
    "peer_without_tunnel_address": (
        {"peer1": GOOD_PEERS["peer1"], "peer2": {"pgvpn_peer_routes": []}},
        None,
        "host peer2: peer 'peer2' has no tunnel address; set pgvpn_peer_addresses",
    ),
    "overlapping_prefixes": (
        {"peer1": GOOD_PEERS["peer1"],
         "peer2": {"pgvpn_peer_addresses": ["10.77.0.2/24"],
                   "pgvpn_peer_routes": ["10.77.0.0/25"]}},
        None,
        "overlapping prefixes: peer 'peer1' (host peer1) tunnel address 10.77.0.1/32 overlaps "
        "peer 'peer2' (host peer2) route 10.77.0.0/25",
    ),
    "duplicate_peer_name": (
        {"peer1": {**GOOD_PEERS["peer1"], "pgvpn_peer_name": "gw"},
         "peer2": {**GOOD_PEERS["peer2"], "pgvpn_peer_name": "gw"}},
        None,
        "pgvpn_peer_name 'gw' is used by hosts peer1, peer2; peer names must be unique",
    ),
    "names_colliding_as_db_roles": (
        {"peer1": {**GOOD_PEERS["peer1"], "pgvpn_peer_name": "gw-1"},
         "peer2": {**GOOD_PEERS["peer2"], "pgvpn_peer_name": "gw_1"}},
        None,
        "peer names gw-1, gw_1 all map to database role 'pgvpn_gw_1'",
    ),
    "reserved_peer_name": (
        {"peer1": GOOD_PEERS["peer1"],
         "peer2": {**GOOD_PEERS["peer2"], "pgvpn_peer_name": "Operator"}},
        None,
        "host peer2: peer name 'Operator' is reserved: its database role 'pgvpn_operator' is one "
        "of pgvpn's own roles",
    ),
    "revoked_peer_name_invalid": (
        GOOD_PEERS,
        None,
        "pgvpn_revoked_peers entry 'not a name' is not a peer name",
    ),
    "revoking_leaves_one_peer": (
        GOOD_PEERS,
        None,
        "group pgvpn_peers needs at least two hosts that are not revoked, it has 1",
    ),
    "unsupported_os": (
        GOOD_PEERS,
        {"ansible_distribution": "CentOS", "ansible_distribution_version": "7.9",
         "ansible_distribution_major_version": "7", "ansible_os_family": "RedHat"},
        "db runs CentOS 7.9 (init: systemd); pgvpn supports Debian 12+ and Ubuntu 22.04+",
    ),
    "old_ubuntu": (
        GOOD_PEERS,
        {"ansible_distribution": "Ubuntu", "ansible_distribution_version": "20.04",
         "ansible_distribution_major_version": "20", "ansible_os_family": "Debian"},
        "db runs Ubuntu 20.04 (init: systemd); pgvpn supports Debian 12+ and Ubuntu 22.04+",
    ),
}


# Variables of group all, per case.
ALL_VARS: dict[str, dict[str, object]] = {
    "revoked_peer_name_invalid": {"pgvpn_revoked_peers": ["not a name"]},
    "revoking_leaves_one_peer": {"pgvpn_revoked_peers": ["peer2"]},
}


@pytest.fixture(scope="module")
def gathered_facts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This machine's facts, gathered once into a jsonfile fact cache, as a template."""
    cache = tmp_path_factory.mktemp("facts")
    env = {**os.environ, "ANSIBLE_CACHE_PLUGIN": "jsonfile",
           "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(cache)}
    subprocess.run(
        [_ansible("ansible"), "localhost", "-i", "localhost,", "-c", "local",
         "-m", "ansible.builtin.setup", "-a", "gather_subset=min",
         "-e", f"ansible_python_interpreter={sys.executable}"],
        env=env, check=True, capture_output=True, text=True, timeout=300,
    )
    files = list(cache.iterdir())
    assert len(files) == 1, files
    return files[0]


def _write_cache(template: Path, cache: Path, overrides: dict[str, str]) -> None:
    """One cache file per host; the OS is systemd-managed Debian 12 unless overridden."""
    raw = json.loads(template.read_text())
    wrapped = "__payload__" in raw
    facts = json.loads(raw["__payload__"]) if wrapped else raw
    facts.update({"ansible_distribution": "Debian", "ansible_distribution_version": "12.8",
                  "ansible_distribution_major_version": "12", "ansible_os_family": "Debian",
                  "ansible_service_mgr": "systemd", "ansible_memtotal_mb": 4096,
                  "_ansible_facts_gathered": True,
                  **overrides})
    body = {"__payload__": json.dumps(facts)} if wrapped else facts
    cache.mkdir()
    for host in HOSTS:
        name = template.name.replace("localhost", host)
        (cache / name).write_text(json.dumps(body))


def _preflight(tmp_path: Path, peers: dict[str, dict[str, object]], template: Path,
               overrides: dict[str, str] | None,
               all_vars: dict[str, object] | None = None) -> subprocess.CompletedProcess[str]:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps(_inventory(peers, all_vars)))
    cache = tmp_path / "facts"
    _write_cache(template, cache, overrides or {})
    env = {**os.environ,
           "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_CACHE_PLUGIN": "jsonfile",
           "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(cache),
           "ANSIBLE_GATHERING": "smart",
           "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0"}
    return subprocess.run(
        [_ansible("ansible-playbook"), str(REPO / "site.yml"), "-i", str(inventory),
         "--check", "--tags", "pgvpn_preflight"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )


def _flat(text: str) -> str:
    """Ansible wraps long messages; compare on single spaces."""
    return " ".join(text.split())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_inventory_fails_with_a_clear_message(case: str, tmp_path: Path,
                                                  gathered_facts: Path) -> None:
    peers, overrides, message = CASES[case]
    result = _preflight(tmp_path, peers, gathered_facts, overrides, ALL_VARS.get(case))
    output = _flat(result.stdout + result.stderr)
    assert result.returncode != 0, output
    assert _flat(message) in output, output


def test_good_inventory_passes_preflight(tmp_path: Path, gathered_facts: Path) -> None:
    result = _preflight(tmp_path, GOOD_PEERS, gathered_facts, None)
    assert result.returncode == 0, _flat(result.stdout + result.stderr)


def test_revoked_peer_is_left_alone(tmp_path: Path, gathered_facts: Path) -> None:
    """A revoked peer's host is sorted out before the agents' play: nothing runs on it."""
    peers = {**GOOD_PEERS, "peer3": {"pgvpn_peer_addresses": ["10.77.0.3/24"]}}
    result = _preflight(tmp_path, peers, gathered_facts, None,
                        {"pgvpn_revoked_peers": ["peer3"]})
    output = _flat(result.stdout + result.stderr)
    assert result.returncode == 0, output
    assert "peer3 : ok=0 changed=0 unreachable=0 failed=0 skipped=1" in output, output


@pytest.mark.parametrize(("extra", "message"), [
    ({"pgvpn_remove_peer": "peer2"}, "Peer peer2 is still in group pgvpn_peers: take its host "
     "out of the inventory first"),
    ({}, "Name the peer to remove with -e pgvpn_remove_peer=<name>"),
])
def test_remove_peer_wants_the_host_out_of_the_inventory_first(
        extra: dict[str, str], message: str, tmp_path: Path) -> None:
    """playbooks/remove-peer.yml refuses, before touching anything, a peer the inventory still
    has: the next site.yml would add it back."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps(_inventory(GOOD_PEERS)))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run(
        [_ansible("ansible-playbook"), str(REPO / "playbooks" / "remove-peer.yml"),
         "-i", str(inventory), "--check", "-e", json.dumps(extra)],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    output = _flat(result.stdout + result.stderr)
    assert result.returncode != 0, output
    assert _flat(message) in output, output
    assert "Remove its links, cursors and role" not in output, output
