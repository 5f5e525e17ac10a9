"""A Markdown reference of the `pgvpn` schema, read from a live, migrated database's catalog.

Why from the catalog and not from the SQL files: the migrations are a history, each altering
the last, and what an operator or a reviewer needs is the result — which role may run which
function, which policies guard which table, what PUBLIC lost. The catalog is what PostgreSQL
enforces, including `REVOKE`s, default privileges and ownership changes no single file shows.
`tests/integration/test_schema_reference.py` compares a freshly migrated database's rendering
with `docs/schema.md`, so the document cannot drift from the migrations.

The output is deterministic: everything is sorted by name (C collation), nothing depends on the
day or on the deployment (no OIDs, no timestamps, no day partitions by name, no login roles,
no owner's own implicit privileges), and expressions are printed with `search_path` set to
`pg_catalog` alone so that every `pgvpn` name comes out schema-qualified.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]

SCHEMA = "pgvpn"
DAY_SUFFIX = re.compile(r"_[0-9]{8}$")

HEADER = """\
# pgvpn schema reference

Generated from the migrations by `pgvpn db reference` (on a database freshly migrated by
`pgvpn db migrate`) and checked in CI: `tests/integration/test_schema_reference.py` fails when
this file and the migrations disagree. Do not edit it by hand; regenerate it with
`PGVPN_UPDATE_REFERENCE=1 .venv/bin/pytest tests/integration/test_schema_reference.py`.

Superusers bypass everything below. An object's owner holds every privilege on it and is not
subject to its row-level security unless it is forced; owners' own privileges are not repeated
under "grants". Login roles (one `pgvpn_<peer>` per peer, `pgvpn_housekeeping`) are made by the
deployment (Ansible, the lab), not by the migrations, and are not listed: they get their rights
only through the group roles below.
"""

# aclexplode() of an object's ACL (or the built-in default when it is NULL), owner left out:
# one "grantee: PRIV, PRIV" string per grantee, sorted. {acl}, {kind}, {owner} are SQL text.
_ACL = """(SELECT coalesce(string_agg(s.g, '; ' ORDER BY s.g COLLATE "C"), '')
  FROM (SELECT CASE e.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(e.grantee)::text END
               || ': ' || string_agg(e.privilege_type
                                     || CASE WHEN e.is_grantable THEN ' (grantable)' ELSE '' END,
                                     ', ' ORDER BY e.privilege_type) AS g
        FROM aclexplode(coalesce({acl}, acldefault('{kind}', {owner}))) e
        WHERE e.grantee <> {owner} GROUP BY e.grantee) s)"""


def _acl(acl: str, kind: str, owner: str) -> str:
    return _ACL.format(acl=acl, kind=kind, owner=owner)


def _rows(conn: Conn, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows of a catalog query (the text is ours, never built from input: no injection)."""
    return conn.execute(query.encode(), params).fetchall()


def _cell(value: object) -> str:
    """Text fit for a table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _code(value: object) -> str:
    text = _cell(value)
    return "" if not text else f"`` {text} ``" if "`" in text else f"`{text}`"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    return out


def _grants(text: str, sep: str = "<br>") -> str:
    return sep.join(_code(g) for g in text.split("; ")) if text else "none"


def render(conn: Conn) -> str:
    """The whole reference as Markdown text (ending with one newline)."""
    with conn.transaction():
        conn.execute("SELECT set_config('search_path', 'pg_catalog', true)")
        parts = [HEADER.rstrip("\n"), ""]
        for section in (_version, _roles, _database, _tables, _views, _functions, _sequences,
                        _types, _catalog_revoked):
            parts += section(conn)
    return "\n".join(parts).rstrip("\n") + "\n"


def _version(conn: Conn) -> list[str]:
    row = _rows(conn, "SELECT version, name FROM pgvpn.schema_version "
                      "ORDER BY version DESC LIMIT 1")
    if not row:
        return ["Schema version: none (not migrated)", ""]
    return [f"Schema version: **{row[0][0]}** (`{row[0][0]:04d}_{row[0][1]}.sql`)", ""]


def _roles(conn: Conn) -> list[str]:
    """Group roles (NOLOGIN `pgvpn_%`): what each may do on its own and whose rights it has."""
    rows = _rows(conn, r"""
        SELECT r.rolname,
               concat_ws(' ', CASE WHEN r.rolsuper THEN 'SUPERUSER' END,
                         CASE WHEN r.rolcreatedb THEN 'CREATEDB' END,
                         CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END,
                         CASE WHEN r.rolreplication THEN 'REPLICATION' END,
                         CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END,
                         CASE WHEN NOT r.rolinherit THEN 'NOINHERIT' END,
                         CASE WHEN r.rolconnlimit <> -1
                              THEN 'CONNECTION LIMIT ' || r.rolconnlimit END),
               (SELECT string_agg(g.rolname || CASE WHEN m.admin_option THEN ' (admin)'
                                                     ELSE '' END, ', '
                                  ORDER BY g.rolname COLLATE "C")
                FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                WHERE m.member = r.oid),
               (SELECT string_agg(array_to_string(s.setconfig, ', '), '; ')
                FROM pg_db_role_setting s
                WHERE s.setrole = r.oid
                  AND s.setdatabase IN (0, (SELECT oid FROM pg_database
                                            WHERE datname = current_database())))
        FROM pg_roles r
        WHERE r.rolname LIKE 'pgvpn\_%' AND NOT r.rolcanlogin
        ORDER BY r.rolname COLLATE "C" """)
    out = ["## Group roles", "",
           "All `NOLOGIN`. Attributes lists what a role has beyond a plain `NOLOGIN` role.", ""]
    return out + _table(
        ["role", "attributes", "member of", "role settings"],
        [[_code(n), _cell(a or "none"), _cell(m or "none"), _code(s or "")]
         for n, a, m, s in rows])


def _database(conn: Conn) -> list[str]:
    """Who may connect and make temporary objects; settings imposed on every session."""
    grants = _rows(conn, f"""
        SELECT {_acl('d.datacl', 'd', 'd.datdba')} FROM pg_database d
        WHERE d.datname = current_database()""")[0][0]
    settings = _rows(conn, """
        SELECT array_to_string(s.setconfig, ', ') FROM pg_db_role_setting s
        JOIN pg_database d ON d.oid = s.setdatabase
        WHERE d.datname = current_database() AND s.setrole = 0""")
    schema = _rows(conn, f"""
        SELECT pg_get_userbyid(n.nspowner), {_acl('n.nspacl', 'n', 'n.nspowner')},
               coalesce(obj_description(n.oid, 'pg_namespace'), '')
        FROM pg_namespace n WHERE n.nspname = %s""", (SCHEMA,))
    defaults = _rows(conn, f"""
        SELECT pg_get_userbyid(a.defaclrole),
               CASE WHEN a.defaclnamespace = 0 THEN 'all schemas'
                    ELSE a.defaclnamespace::regnamespace::text END,
               CASE a.defaclobjtype WHEN 'r' THEN 'tables' WHEN 'S' THEN 'sequences'
                    WHEN 'f' THEN 'functions' WHEN 'T' THEN 'types' ELSE 'schemas' END,
               {_acl('a.defaclacl', 'f', 'a.defaclrole')}
        FROM pg_default_acl a""")
    out = ["## Database and schema", "",
           f"- This database: {_grants(grants, ', ')}" + (f"; settings `{settings[0][0]}`"
                                                     if settings else "")]
    if schema:
        owner, acl, comment = schema[0]
        out.append(f"- Schema `{SCHEMA}`: owner `{owner}`; {_grants(acl, ', ')}"
                   + (f". {comment}" if comment else ""))
    out.append("")
    if defaults:
        out += ["Default privileges (applied to objects the role creates later; for an",
                "\"all schemas\" entry the list replaces PostgreSQL's built-in default):", ""]
        out += _table(["role", "in", "on", "granted besides the owner"],
                      [[_code(r), _cell(n), o, _grants(a)] for r, n, o, a in sorted(defaults)])
    return out


def _tables(conn: Conn) -> list[str]:
    rows = _rows(conn, f"""
        SELECT c.oid, c.relname, c.relkind = 'p', pg_get_userbyid(c.relowner),
               c.relrowsecurity, c.relforcerowsecurity,
               coalesce(array_to_string(c.reloptions, ', '), ''),
               coalesce(obj_description(c.oid, 'pg_class'), ''),
               {_acl('c.relacl', 'r', 'c.relowner')}
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
        ORDER BY c.relname COLLATE "C" """, (SCHEMA,))
    out = ["## Tables", ""]
    for oid, name, partitioned, owner, rls, force, options, comment, acl in rows:
        out += [f"### `{SCHEMA}.{name}`", ""]
        if comment:
            out += [comment, ""]
        facts = [f"owner `{owner}`",
                 "row-level security " + ("enabled and forced" if rls and force else
                                          "enabled, not forced" if rls else "off")]
        if options:
            facts.append(f"options `{options}`")
        out += ["; ".join(facts).capitalize() + ".", ""]
        out += _columns(conn, oid)
        out += _constraints(conn, oid)
        out += _policies(conn, oid)
        out += ["Grants: " + _grants(_join(acl, _column_grants(conn, oid))), ""]
        if partitioned:
            out += _partitions(conn, oid, name)
    return out


def _join(*grants: str) -> str:
    return "; ".join(sorted((g for g in "; ".join(grants).split("; ") if g), key=str))


def _columns(conn: Conn, oid: int) -> list[str]:
    rows = _rows(conn, """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               CASE WHEN a.attgenerated = 's'
                    THEN 'GENERATED ALWAYS AS (' || pg_get_expr(d.adbin, d.adrelid) || ') STORED'
                    WHEN a.attidentity = 'a' THEN 'GENERATED ALWAYS AS IDENTITY'
                    WHEN a.attidentity = 'd' THEN 'GENERATED BY DEFAULT AS IDENTITY'
                    ELSE coalesce(pg_get_expr(d.adbin, d.adrelid), '') END,
               concat_ws(' ', CASE WHEN a.attstattarget = 0 THEN '(no statistics)' END,
                         CASE WHEN a.attstorage <> t.typstorage
                                   THEN '(storage ' || CASE a.attstorage WHEN 'p' THEN 'PLAIN'
                                        WHEN 'e' THEN 'EXTERNAL' WHEN 'm' THEN 'MAIN'
                                        ELSE 'EXTENDED' END || ')' END,
                         col_description(a.attrelid, a.attnum))
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum""", (oid,))
    return _table(["column", "type", "not null", "default", "comment"],
                  [[_code(n), _code(t), "yes" if nn else "", _code(d), _cell(c)]
                   for n, t, nn, d, c in rows])


def _constraints(conn: Conn, oid: int) -> list[str]:
    """Constraints and the indexes, triggers that are not constraints (rules of the table)."""
    rows = _rows(conn, """
        SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s
        UNION ALL
        SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = %s
          AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        UNION ALL
        SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger
        WHERE tgrelid = %s AND NOT tgisinternal AND tgparentid = 0
        """, (oid, oid, oid))
    if not rows:
        return []
    return ["Constraints, indexes and triggers:", ""] + [
        f"- `{n}`: {_code(d)}" for n, d in sorted(rows)] + [""]


def _policies(conn: Conn, oid: int) -> list[str]:
    rows = _rows(conn, """
        SELECT p.polname,
               CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                             WHEN 'd' THEN 'DELETE' ELSE 'ALL' END
               || CASE WHEN p.polpermissive THEN '' ELSE ' (restrictive)' END,
               (SELECT string_agg(q.n, ', ' ORDER BY q.n COLLATE "C")
                FROM (SELECT CASE r WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(r)::text END AS n
                      FROM unnest(p.polroles) r) q),
               coalesce(pg_get_expr(p.polqual, p.polrelid), ''),
               coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')
        FROM pg_policy p WHERE p.polrelid = %s ORDER BY p.polname COLLATE "C" """, (oid,))
    if not rows:
        return []
    return ["Policies:", "", *_table(
        ["policy", "command", "roles", "USING", "WITH CHECK"],
        [[_code(n), c, _cell(r), _code(u), _code(w)] for n, c, r, u, w in rows])]


def _column_grants(conn: Conn, oid: int) -> str:
    rows = _rows(conn, """
        SELECT CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END
               || ': ' || a.privilege_type || ' ('
               || string_agg(c.attname, ', ' ORDER BY c.attname COLLATE "C") || ')'
        FROM pg_attribute c, aclexplode(c.attacl) a
        WHERE c.attrelid = %s AND c.attnum > 0 AND c.attacl IS NOT NULL
        GROUP BY a.grantee, a.privilege_type""", (oid,))
    return "; ".join(sorted(r[0] for r in rows))


def _partitions(conn: Conn, oid: int, name: str) -> list[str]:
    """Partitions, day partitions folded into one `<table>_YYYYMMDD` line: they come and go,
    and what matters is that they are alike — a partition queried directly is governed by its
    own grants and row-level security, not by the parent's policies."""
    rows = _rows(conn, f"""
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), pg_get_userbyid(c.relowner),
               c.relrowsecurity, c.relforcerowsecurity, {_acl('c.relacl', 'r', 'c.relowner')},
               (SELECT coalesce(string_agg(a.attname, ', ' ORDER BY a.attnum), 'none')
                FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                  AND NOT a.attisdropped AND a.attstattarget <> 0)
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = %s ORDER BY c.relname COLLATE "C" """, (oid,))
    seen: dict[tuple[str, ...], None] = {}
    for part, bound, owner, rls, force, acl, statistics in rows:
        day = DAY_SUFFIX.search(part) is not None
        shown = DAY_SUFFIX.sub("_YYYYMMDD", part) if day else part
        what = "one UTC day, made ahead by `pgvpn.ensure_partitions()`" if day else bound
        security = "forced" if rls and force else "enabled" if rls else "off"
        seen[(shown, what, owner, security, _grants(acl), statistics)] = None
    out = [f"Partitions of `{SCHEMA}.{name}` (queried directly, a partition has its own "
           "grants and row-level security, not its parent's):", ""]
    return out + _table(["partition", "bounds", "owner", "row-level security", "grants",
                         "columns with statistics"],
                        [[_code(p), _cell(w), _code(o), s, g, _cell(st)]
                         for p, w, o, s, g, st in sorted(seen)])


def _views(conn: Conn) -> list[str]:
    rows = _rows(conn, f"""
        SELECT c.relname, pg_get_userbyid(c.relowner),
               coalesce(array_to_string(c.reloptions, ', '), ''),
               coalesce(obj_description(c.oid, 'pg_class'), ''),
               {_acl('c.relacl', 'r', 'c.relowner')}, pg_get_viewdef(c.oid, true)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relkind IN ('v', 'm')
        ORDER BY c.relname COLLATE "C" """, (SCHEMA,))
    out = ["## Views", "",
           "A view reads its tables with its owner's rights (unless `security_invoker`), so "
           "row-level security does not apply to whoever may select from it.", ""]
    for name, owner, options, comment, acl, definition in rows:
        out += [f"### `{SCHEMA}.{name}`", ""] + ([comment, ""] if comment else [])
        out += [f"Owner `{owner}`" + (f"; options `{options}`" if options else "")
                + f". Grants: {_grants(acl)}", "", "```sql", definition.strip(), "```", ""]
    return out


def _functions(conn: Conn) -> list[str]:
    rows = _rows(conn, f"""
        SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
               l.lanname,
               CASE p.provolatile WHEN 'i' THEN 'IMMUTABLE' WHEN 's' THEN 'STABLE'
                                  ELSE 'VOLATILE' END
               || CASE WHEN p.proisstrict THEN ', STRICT' ELSE '' END,
               p.prosecdef, pg_get_userbyid(p.proowner),
               coalesce((SELECT string_agg('`SET ' || c || '`', ', ' ORDER BY c COLLATE "C")
                         FROM unnest(p.proconfig) c), ''),
               coalesce(obj_description(p.oid, 'pg_proc'), ''),
               {_acl('p.proacl', 'f', 'p.proowner')}, p.prokind = 'p'
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        JOIN pg_language l ON l.oid = p.prolang
        WHERE n.nspname = %s
        ORDER BY p.proname COLLATE "C", pg_get_function_identity_arguments(p.oid) COLLATE "C"
        """, (SCHEMA,))
    out = ["## Functions", "",
           "A `SECURITY DEFINER` function runs with its owner's rights; who may call it is the",
           "EXECUTE list (a function without an explicit grant is executable by PUBLIC).", ""]
    out += _table(["function", "security", "EXECUTE by (besides owner)"],
                  [[_code(f"{SCHEMA}.{r[0]}"), "DEFINER" if r[5] else "invoker",
                    _holders(r[9], "EXECUTE")] for r in rows])
    for name, args, result, lang, volatility, definer, owner, config, comment, _, proc in rows:
        out += [f"### `{SCHEMA}.{name}`", ""] + ([comment, ""] if comment else [])
        # a procedure returns nothing; CALL runs it, at the top level it may commit
        head = f"CALL {SCHEMA}.{name}({args})" if proc else f"{SCHEMA}.{name}({args})"
        out += ["```sql", *_wrap(head, "    ")] + ([] if proc else [f"RETURNS {result}"])
        out += ["```", ""]
        facts = [f"`{lang}`"] + ([] if proc else [volatility]) + [
            "**SECURITY DEFINER**" if definer else "SECURITY INVOKER",
            f"owner `{owner}`"] + ([config] if config else [])
        out += [", ".join(facts) + ".", ""]
    return out


def _holders(acl: str, privilege: str) -> str:
    """`PUBLIC: EXECUTE; pgvpn_agent: EXECUTE` -> `PUBLIC, pgvpn_agent`."""
    return ", ".join(g.split(": ")[0] for g in acl.split("; ") if privilege in g) or "nobody"


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, 100 - len(indent), subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def _sequences(conn: Conn) -> list[str]:
    rows = _rows(conn, f"""
        SELECT c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin,
               s.seqmax, s.seqcycle, pg_get_userbyid(c.relowner),
               coalesce((SELECT pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid)
                         FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                           AND d.objid = c.oid AND d.deptype IN ('a', 'i')), ''),
               {_acl('c.relacl', 's', 'c.relowner')}
        FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s ORDER BY c.relname COLLATE "C" """, (SCHEMA,))
    out = ["## Sequences", ""]
    return out + _table(
        ["sequence", "type", "range", "owned by", "owner", "grants"],
        [[_code(f"{SCHEMA}.{n}"), _code(t),
          f"{lo}..{hi} from {start} by {inc}" + (", cycles" if cyc else ""),
          _cell(col), _code(own), _grants(acl)]
         for n, t, start, inc, lo, hi, cyc, own, col, acl in rows])


def _types(conn: Conn) -> list[str]:
    """Free-standing types (enums, domains, composites): table row types are not listed."""
    rows = _rows(conn, """
        SELECT t.typname, CASE t.typtype WHEN 'e' THEN 'enum' WHEN 'd' THEN 'domain over '
               || format_type(t.typbasetype, t.typtypmod) WHEN 'c' THEN 'composite'
               ELSE t.typtype::text END, pg_get_userbyid(t.typowner)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE n.nspname = %s AND t.typelem = 0 AND coalesce(c.relkind, 'c') = 'c'
        ORDER BY t.typname COLLATE "C" """, (SCHEMA,))
    if not rows:
        return []
    return ["## Types", "", *_table(["type", "kind", "owner"],
                                    [[_code(f"{SCHEMA}.{n}"), _cell(k), _code(o)]
                                     for n, k, o in rows])]


_REVOKED = """
    SELECT 'Functions', 'EXECUTE', p.oid::regprocedure::text, {fn_acl}
    FROM pg_proc p LEFT JOIN pg_init_privs i
         ON i.objoid = p.oid AND i.classoid = 'pg_proc'::regclass AND i.objsubid = 0
    WHERE p.pronamespace = 'pg_catalog'::regnamespace
      AND NOT EXISTS (SELECT FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                      WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
      AND EXISTS (SELECT FROM aclexplode(coalesce(i.initprivs, acldefault('f', p.proowner))) a
                  WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
    UNION ALL
    SELECT 'Views and tables', 'SELECT', c.relname::text, {rel_acl}
    FROM pg_class c LEFT JOIN pg_init_privs i
         ON i.objoid = c.oid AND i.classoid = 'pg_class'::regclass AND i.objsubid = 0
    WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind IN ('r', 'v', 'm')
      AND NOT EXISTS (SELECT FROM aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                      WHERE a.grantee = 0 AND a.privilege_type = 'SELECT')
      AND EXISTS (SELECT FROM aclexplode(i.initprivs) a
                  WHERE a.grantee = 0 AND a.privilege_type = 'SELECT')
"""


def _catalog_revoked(conn: Conn) -> list[str]:
    """`pg_catalog` objects PUBLIC could use after initdb and no longer can here, grouped by
    who may use them instead.

    Compared with `pg_init_privs`, so what initdb itself restricts (`pg_read_file`, ...) is not
    listed: what remains is what pgvpn took away (advisory locks, large objects, statistics)."""
    query = _REVOKED.format(fn_acl=_acl("p.proacl", "f", "p.proowner"),
                            rel_acl=_acl("c.relacl", "r", "c.relowner"))
    groups: dict[tuple[str, str, str], list[str]] = {}
    for kind, privilege, name, acl in _rows(conn, query):
        groups.setdefault((kind, privilege, _holders(acl, privilege)), []).append(name)
    out = ["## `pg_catalog` objects revoked from PUBLIC", ""]
    if not groups:
        return [*out, "None: every `pg_catalog` object keeps its initdb privileges.", ""]
    out += ["PUBLIC may use these after `initdb`; in this database only the roles named may",
            "(besides superusers).", ""]
    for (kind, privilege, users), names in sorted(groups.items()):
        out += [f"{kind}, {privilege} by {users}:", "",
                *_wrap(", ".join(f"`{n}`" for n in sorted(names))), ""]
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m pgvpn_agent.reference --dsn DSN`: print the reference to stdout."""
    parser = argparse.ArgumentParser(prog="pgvpn db reference",
                                     description="Print the pgvpn schema reference (Markdown).")
    parser.add_argument("--dsn", required=True, help="a superuser's (or the owner's) DSN")
    args = parser.parse_args(argv)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        sys.stdout.write(render(conn))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
