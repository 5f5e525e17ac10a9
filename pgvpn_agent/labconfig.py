"""What each lab agent is told: its config file (TOML) and, with encryption, its keys file."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pgvpn_agent import seal
from pgvpn_agent.labhost import role

if TYPE_CHECKING:
    from pgvpn_agent.lab import Lab, LabPeer

METRICS_PORT = 9478


def agent_config(lab: Lab, peer: LabPeer) -> str:
    database = [f'dsn = "{lab.dsn(role(peer.name))}"']
    if lab.tcp:
        database = [f'dsn = "host={peer.mgmt_host} port={lab.port} dbname=pgvpn '
                    f'user={role(peer.name)}"', "allow_plaintext = true",
                    'sslmode = "disable"']
    lines = [f'peer = "{peer.name}"', f'mode = "{lab.mode}"', "", "[database]", *database,
             "", "[tun]", f'name = "{peer.tun}"',
             f"mtu = {lab.mtu}", f"offload = {json.dumps(lab.offload)}",
             f"join_bursts = {json.dumps(lab.join_bursts)}", "",
             "[transport]"]
    transport = dict(lab.transport)
    transport.setdefault("state_file", str(lab.workdir / f"{peer.name}.state.json"))
    if lab.mode == "payload":
        # the lab's database is this machine's, its roles the lab's own: nobody else listens
        transport.setdefault("allow_payload_mode", True)
    lines += [f"{k} = {json.dumps(v)}" for k, v in transport.items()]
    lines += ["", "[metrics]", "enabled = true", f'address = "{peer.metrics_host}"',
              f"port = {METRICS_PORT}", ""]
    if lab.encrypt:
        lines += ["[encryption]", f'keys_file = "{lab.keys_file(peer)}"', ""]
    for p in lab.peers:
        lines += ["[[peers]]", f'name = "{p.name}"',
                  f'addresses = ["{p.ipv4}/16", "{p.ipv6}/64"]', ""]
    return "\n".join(lines)


def keys_files(names: list[str]) -> dict[str, str]:
    """One new key per pair of peers: each peer's keys file, the keys of its links."""
    tables: dict[str, list[str]] = {name: [] for name in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            key = seal.new_key()
            tables[a] += [f"[keys.{b}]", f'1 = "{key}"']
            tables[b] += [f"[keys.{a}]", f'1 = "{key}"']
    return {name: "\n".join(lines) + "\n" for name, lines in tables.items()}
