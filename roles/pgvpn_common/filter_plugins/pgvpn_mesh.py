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
# Roles of the project itself (group roles made by `pgvpn db migrate`, the housekeeping and
# metrics logins): a peer whose role would be one of them is refused, here and by the schema.
_RESERVED_ROLES = ("pgvpn_agent", "pgvpn_reader", "pgvpn_operator", "pgvpn_owner",
                   "pgvpn_housekeeping", "pgvpn_metrics")
# Joins the two names of a pair in its key file's name: a character no peer name holds, so
# the file of one pair can never be read as another's ("a-b--c" was a--b-c or a-b--c).
PAIR_SEPARATOR = "+"


def pgvpn_db_role(peer_name, prefix="pgvpn_"):
    """Database role of a peer: names may hold '-' or '.', roles are kept to [a-z0-9_]."""
    return prefix + re.sub(r"[^a-z0-9_]", "_", str(peer_name).lower())


def pgvpn_pair(name_a, name_b):
    """Name of the key files one pair of peers shares: both names, sorted, joined by '+'."""
    return PAIR_SEPARATOR.join(sorted((str(name_a), str(name_b))))


def pgvpn_legacy_pair(name_a, name_b):
    """The name releases up to schema v10 gave a pair's key files (ambiguous: names hold '-');
    Jinja's sort, which made it, ignores case."""
    return "--".join(sorted((str(name_a), str(name_b)), key=str.lower))


def pgvpn_pair_key_moves(names, key_ids, keys_dir):
    """Key files to rename from the legacy pair name to pgvpn_pair(), as [{'src', 'dest'}].

    A legacy name that two pairs of the mesh share is left alone: it cannot be known whose key
    it was, and both pairs get new keys rather than one that another pair may hold too.
    """
    names = sorted({str(n) for n in _as_list(names)})
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    legacy = {}
    for a, b in pairs:
        legacy.setdefault(pgvpn_legacy_pair(a, b), []).append((a, b))
    moves = []
    for old, owners in sorted(legacy.items()):
        if len(owners) != 1:
            continue
        new = pgvpn_pair(*owners[0])
        for key_id in _as_list(key_ids):
            moves.append({"src": f"{keys_dir}/{old}.{int(key_id)}",
                          "dest": f"{keys_dir}/{new}.{int(key_id)}"})
    return moves


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    return list(value)


def pgvpn_mesh(hostvars, hosts, role_prefix="pgvpn_", revoked=None):
    """Returns {'peers': [...], 'revoked': [...], 'errors': [...]} for the inventory hosts given
    (group pgvpn_peers) and the names of revoked peers (pgvpn_revoked_peers).

    A revoked peer is left out of 'peers' whether or not a host still carries its name: no
    other peer lists it, pg_hba admits it from nowhere, its role stays NOLOGIN. 'revoked' holds
    {'name', 'db_role', 'host'} (host: None when no inventory host has that name any more).
    """
    peers = []
    errors = []
    revoked_names = []
    for name in _as_list(revoked):
        if not isinstance(name, str) or not _PEER_NAME.match(name):
            errors.append(
                f"pgvpn_revoked_peers entry {name!r} is not a peer name (1-50 letters, digits, "
                "'_', '.' or '-'); list the revoked peers' pgvpn_peer_name values"
            )
        elif name not in revoked_names:
            revoked_names.append(name)
    revoked_hosts = {}
    for host in _as_list(hosts):
        hv = hostvars[host]
        name = str(hv.get("pgvpn_peer_name", host))
        if name in revoked_names:
            revoked_hosts[name] = host
            continue
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
        if p["db_role"] in _RESERVED_ROLES:
            errors.append(
                f"host {p['host']}: peer name {p['name']!r} is reserved: its database role "
                f"{p['db_role']!r} is one of pgvpn's own roles ({', '.join(_RESERVED_ROLES)}); "
                "set another pgvpn_peer_name in its host_vars"
            )
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
    revoked_peers = [{"name": name, "db_role": pgvpn_db_role(name, role_prefix),
                      "host": revoked_hosts.get(name)} for name in revoked_names]
    return {"peers": peers, "revoked": revoked_peers, "errors": errors}


class FilterModule:
    def filters(self):
        return {"pgvpn_mesh": pgvpn_mesh, "pgvpn_db_role": pgvpn_db_role, "pgvpn_pair": pgvpn_pair,
                "pgvpn_legacy_pair": pgvpn_legacy_pair,
                "pgvpn_pair_key_moves": pgvpn_pair_key_moves}
