"""The pgvpn peer mesh, read from the inventory and checked before anything is deployed.

Both the database and the peers need the same view of the mesh (peer names, their database
roles, tunnel addresses and routes), and a mistake in it (a duplicate name, two peers claiming
the same prefix) would otherwise surface as a confusing failure deep in a later task or, worse,
as packets silently routed to the wrong peer. Every error names the host and variable to fix.
"""

from __future__ import annotations

import ipaddress
import re

# Same rule as the agent's config (pgvpn_agent/config.py PEER_NAME) and the pgvpn.peer table.
_PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")
_PG_IDENTIFIER_MAX = 63


def pgvpn_db_role(peer_name, prefix="pgvpn_"):
    """Database role of a peer: names may hold '-' or '.', roles are kept to [a-z0-9_]."""
    return prefix + re.sub(r"[^a-z0-9_]", "_", str(peer_name).lower())


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    return list(value)


def pgvpn_mesh(hostvars, hosts, role_prefix="pgvpn_"):
    """Returns {'peers': [...], 'errors': [...]} for the inventory hosts given (group pgvpn_peers)."""
    peers = []
    errors = []
    for host in _as_list(hosts):
        hv = hostvars[host]
        name = str(hv.get("pgvpn_peer_name", host))
        where = f"host {host}"
        if not _PEER_NAME.match(name):
            errors.append(
                f"{where}: pgvpn_peer_name {name!r} must be 1-50 letters, digits, '_', '.' or '-' "
                "starting with a letter or digit; set pgvpn_peer_name in its host_vars"
            )
        raw_addresses = _as_list(hv.get("pgvpn_peer_addresses"))
        if not raw_addresses:
            errors.append(
                f"{where}: peer {name!r} has no tunnel address; set pgvpn_peer_addresses in its "
                "host_vars, e.g. pgvpn_peer_addresses: ['10.77.0.1/24', 'fd77::1/64']"
            )
        addresses = []
        for a in raw_addresses:
            try:
                addresses.append(ipaddress.ip_interface(str(a)))
            except ValueError:
                errors.append(
                    f"{where}: pgvpn_peer_addresses entry {str(a)!r} is not an address with a "
                    "prefix length, e.g. 10.77.0.1/24"
                )
        routes = []
        for r in _as_list(hv.get("pgvpn_peer_routes")):
            try:
                routes.append(ipaddress.ip_network(str(r)))
            except ValueError as exc:
                errors.append(f"{where}: pgvpn_peer_routes entry {str(r)!r}: {exc}")
        source = str(hv.get("pgvpn_peer_source_address", hv.get("ansible_host", host)))
        peers.append({
            "host": host,
            "name": name,
            "db_role": pgvpn_db_role(name, role_prefix),
            "addresses": [str(a) for a in addresses],
            "routes": [str(r) for r in routes],
            "source_address": source,
            # What is routed to this peer: its tunnel addresses as hosts, and its routes.
            "_prefixes": [(ipaddress.ip_network(a.ip), "tunnel address") for a in addresses]
            + [(r, "route") for r in routes],
        })

    by_name = {}
    by_role = {}
    for p in peers:
        by_name.setdefault(p["name"], []).append(p["host"])
        by_role.setdefault(p["db_role"], set()).add(p["name"])
        if len(p["db_role"]) > _PG_IDENTIFIER_MAX:
            errors.append(
                f"host {p['host']}: database role {p['db_role']!r} is longer than "
                f"{_PG_IDENTIFIER_MAX} characters; shorten pgvpn_peer_name"
            )
    for name, owners in by_name.items():
        if len(owners) > 1:
            errors.append(
                f"pgvpn_peer_name {name!r} is used by hosts {', '.join(owners)}; "
                "peer names must be unique: set a distinct pgvpn_peer_name on each"
            )
    for role, names in by_role.items():
        if len(names) > 1:
            errors.append(
                f"peer names {', '.join(sorted(names))} all map to database role {role!r}; "
                "rename one (roles keep only [a-z0-9_], other characters become '_')"
            )

    for i, a in enumerate(peers):
        for b in peers[i + 1:]:
            if a["name"] == b["name"]:
                continue
            for net_a, kind_a in a["_prefixes"]:
                for net_b, kind_b in b["_prefixes"]:
                    if net_a.version == net_b.version and net_a.overlaps(net_b):
                        errors.append(
                            f"overlapping prefixes: peer {a['name']!r} (host {a['host']}) "
                            f"{kind_a} {net_a} overlaps peer {b['name']!r} (host {b['host']}) "
                            f"{kind_b} {net_b}; every destination must belong to exactly one "
                            "peer: fix pgvpn_peer_addresses / pgvpn_peer_routes"
                        )
    for p in peers:
        del p["_prefixes"]
    return {"peers": peers, "errors": errors}


class FilterModule:
    def filters(self):
        return {"pgvpn_mesh": pgvpn_mesh, "pgvpn_db_role": pgvpn_db_role}
