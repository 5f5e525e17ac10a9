"""Revocation on the controller: the pair keys and client certificate of the revoked peer move
to retired/, every other peer's stay (pgvpn_agent's retire.yml, as playbooks/revoke-peer.yml
runs it).

    python -m pytest molecule/preflight/test_retire.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_preflight import REPO, _ansible

PLAY = """
- name: Retire the secrets it held
  hosts: pgvpn_peers
  gather_facts: false
  tasks:
    - name: Move its pair keys and client certificate aside on the controller
      ansible.builtin.include_role:
        name: pgvpn_agent
        tasks_from: retire.yml
        apply:
          delegate_to: localhost
          run_once: true
      run_once: true
"""

RETIRED = ["branch-gw+office-gw.1", "branch-gw+office-gw.2", "branch-gw+cloud-gw.1",
           "branch-gw--office-gw.1", "branch-gw--cloud-gw.1"]
KEPT = ["cloud-gw+office-gw.1", "branch-gw-b+office-gw.1", "branch-gw.x+office-gw.1",
        "branch-gw-b--office-gw.1"]


def test_revoked_peers_keys_and_certificate_retire(tmp_path: Path) -> None:
    keys, clients = tmp_path / "keys", tmp_path / "tls" / "clients"
    keys.mkdir()
    clients.mkdir(parents=True)
    for name in RETIRED + KEPT:
        (keys / name).write_text("00" * 32)
    for name in ("pgvpn_branch_gw.key", "pgvpn_branch_gw.crt", "pgvpn_office_gw.key"):
        (clients / name).write_text("x")
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    peers = {"office-gw": {}, "gw2": {"pgvpn_peer_name": "branch-gw"}, "cloud": {
        "pgvpn_peer_name": "cloud-gw"}, "b": {"pgvpn_peer_name": "branch-gw-b"}}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"all": {"vars": local, "children": {
        "pgvpn_peers": {"hosts": peers}}}}))
    playbook = tmp_path / "retire.yml"
    playbook.write_text(PLAY)
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run(
        [_ansible("ansible-playbook"), str(playbook), "-i", str(inventory),
         "-e", json.dumps({"pgvpn_revoke_peer": "branch-gw",
                           "pgvpn_agent_encryption_keys_dir": str(keys),
                           "pgvpn_agent_db_tls_dir": str(tmp_path / "tls")})],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr

    (retired_keys,) = (keys / "retired").iterdir()
    assert retired_keys.name.startswith("branch-gw-")
    assert sorted(p.name for p in retired_keys.iterdir()) == sorted(RETIRED)
    assert sorted(p.name for p in keys.iterdir() if p.is_file()) == sorted(KEPT)
    (retired_cert,) = (clients / "retired").iterdir()
    assert sorted(p.name for p in retired_cert.iterdir()) == [
        "pgvpn_branch_gw.crt", "pgvpn_branch_gw.key"]
    assert [p.name for p in clients.iterdir() if p.is_file()] == ["pgvpn_office_gw.key"]
