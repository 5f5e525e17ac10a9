"""The failover tests' standby (pgvpn_agent.labstandby), promoted by hand as Patroni would, and
agents that name both servers."""

from __future__ import annotations

import re
from pathlib import Path

from pgvpn_agent.lab import Lab, LabPeer
from pgvpn_agent.labstandby import Standby

__all__ = ["Standby", "both_servers", "with_standby"]


def both_servers(lab: Lab, peer: LabPeer, standby: Standby) -> None:
    """The agent's dsn names the primary and the standby, in that order."""
    path = Path(peer.config)
    text = path.read_text()
    path.write_text(re.sub(rf"host=(\S+) port={lab.port} ",
                           rf"host=\1,\1 port={lab.port},{standby.port} ", text))


def with_standby(lab: Lab, standby: Standby) -> None:
    """The standby made, and every agent started with a dsn naming both servers."""
    standby.create()
    for peer in lab.peers:
        both_servers(lab, peer, standby)
        lab.start_agent(peer)
    lab.wait_mesh(timeout=30)
