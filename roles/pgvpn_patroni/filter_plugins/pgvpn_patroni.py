"""PostgreSQL settings and pg_hba rules carried from pgvpn_postgresql's templates into Patroni.

Under Patroni, PostgreSQL's configuration files are Patroni's to write: settings come from its
YAML (local ones) or from the DCS (those every node must share), pg_hba from a list. The
single-host role renders `conf.d/pgvpn.conf` and `pg_hba.conf`; parsing those renderings, rather
than keeping a second copy of each rule, makes a setting added to the role's templates reach the
HA cluster too.
"""

from __future__ import annotations

import re

# Settings Patroni passes on postgres' command line (patroni/postgresql/config.py,
# CMDLINE_OPTIONS): it ignores them in a node's own YAML, they live in the DCS so that every node
# runs with the same value (a standby needs max_connections and the other max_* at least the
# primary's, or it stops replaying).
_GLOBAL = frozenset({
    "max_connections", "max_wal_senders", "max_replication_slots", "max_worker_processes",
    "max_prepared_transactions", "max_locks_per_transaction", "track_commit_timestamp",
    "wal_level", "wal_keep_size", "wal_keep_segments",
})
# Patroni's own: the listen address and port from postgresql.listen, the rest from its logic.
_PATRONI = frozenset({
    "listen_addresses", "port", "cluster_name", "hot_standby", "wal_log_hints",
    "synchronous_standby_names",
})
_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=?\s*(.*?)\s*$")


def _value(raw):
    if raw.startswith("'"):
        out, i = [], 1
        while i < len(raw):
            if raw[i] == "'":
                if raw[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(raw[i])
            i += 1
        return "".join(out)
    raw = raw.split("#", 1)[0].strip()
    return int(raw) if re.fullmatch(r"-?[0-9]+", raw) else raw


def pgvpn_postgresql_conf(text):
    """postgresql.conf text -> {name: value}; comments, blank lines and includes skipped, the
    last assignment of a name wins (as in PostgreSQL)."""
    settings = {}
    for line in str(text).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if not match or match.group(1) in ("include", "include_dir", "include_if_exists"):
            continue
        settings[match.group(1)] = _value(match.group(2))
    return settings


def pgvpn_patroni_parameters(settings, scope):
    """Split settings by where Patroni takes them: scope 'local' (the node's YAML) or 'global'
    (the DCS); Patroni's own are in neither."""
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be local or global, not {scope!r}")
    return {name: value for name, value in dict(settings).items()
            if name not in _PATRONI and (name in _GLOBAL) == (scope == "global")}


def pgvpn_pg_hba(text):
    """pg_hba.conf text -> its rules, one string each, comments and blank lines left out."""
    return [" ".join(line.split()) for line in str(text).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


class FilterModule:
    def filters(self):
        return {
            "pgvpn_postgresql_conf": pgvpn_postgresql_conf,
            "pgvpn_patroni_parameters": pgvpn_patroni_parameters,
            "pgvpn_pg_hba": pgvpn_pg_hba,
        }
