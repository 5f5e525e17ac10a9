"""docs/schema.md is what the migrations make: rendered from a freshly migrated database.

The reference is read from the catalog (pgvpn_agent/reference.py), so a migration that changes a
grant, a policy or a function's settings changes the rendering; this test makes that change show
up in review as a diff of docs/schema.md instead of going unnoticed.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import psycopg
import pytest

from pgvpn_agent import reference

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "schema.md"
UPDATE = "PGVPN_UPDATE_REFERENCE"


def test_schema_reference_matches_the_migrations(make_lab):
    lab = make_lab(agents=False)
    with psycopg.connect(lab.dsn(), autocommit=True) as conn:
        text = reference.render(conn)
        # nothing in it depends on the day, the session or how many days are made ahead
        conn.execute("SET search_path = pgvpn, public")
        conn.execute("SELECT pgvpn.ensure_partitions(9)")
        assert reference.render(conn) == text, "the reference is not deterministic"
    if os.environ.get(UPDATE) == "1":
        DOC.write_text(text)
        return
    current = DOC.read_text() if DOC.exists() else ""
    if current != text:
        diff = "".join(difflib.unified_diff(
            current.splitlines(keepends=True), text.splitlines(keepends=True),
            fromfile="docs/schema.md", tofile="rendered from the migrations"))
        pytest.fail(
            "docs/schema.md does not match the schema the migrations make. Regenerate it with\n"
            f"  {UPDATE}=1 .venv/bin/pytest tests/integration/test_schema_reference.py\n"
            "or, against any freshly migrated database,\n"
            "  .venv/bin/python -m pgvpn_agent.reference --dsn DSN > docs/schema.md\n"
            f"and review the change.\n\n{diff}", pytrace=False)
