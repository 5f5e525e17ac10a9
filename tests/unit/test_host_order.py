"""After a failover the host a session lost is tried last, not first (db._last_tried_last)."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgvpn_agent.db import _last_tried_last


def hosts(conninfo: str) -> list[tuple[str, str]]:
    params = conninfo_to_dict(conninfo)
    names = str(params["host"]).split(",")
    ports = str(params.get("port", "")).split(",")
    return list(zip(names, ports * len(names) if len(ports) == 1 else ports, strict=True))


DSN = "host=db1,db2,db3 port=5432 dbname=pgvpn target_session_attrs=read-write"


def test_the_lost_host_goes_last():
    moved = _last_tried_last(DSN, ("db1", "5432"))
    assert [h for h, _ in hosts(moved)] == ["db2", "db3", "db1"]
    assert conninfo_to_dict(moved)["target_session_attrs"] == "read-write"
    assert [h for h, _ in hosts(_last_tried_last(DSN, ("db2", "5432")))] == ["db1", "db3", "db2"]


def test_ports_and_addresses_move_with_their_host():
    dsn = "host=a,a,b hostaddr=10.0.0.1,10.0.0.1,10.0.0.2 port=5432,5433,5432 dbname=pgvpn"
    moved = conninfo_to_dict(_last_tried_last(dsn, ("a", "5432")))
    assert moved["host"] == "a,b,a"
    assert moved["port"] == "5433,5432,5432"
    assert moved["hostaddr"] == "10.0.0.1,10.0.0.2,10.0.0.1"


@pytest.mark.parametrize(("dsn", "failed"), [
    ("host=db1 port=5432 dbname=pgvpn", ("db1", "5432")),     # one host: nothing to reorder
    (DSN, None),                                               # first connection
    (DSN, ("db9", "5432")),                                    # a host not in the list
])
def test_otherwise_unchanged(dsn, failed):
    assert hosts(_last_tried_last(dsn, failed)) == hosts(dsn)


def test_a_port_list_that_libpq_would_refuse_is_left_for_libpq_to_refuse():
    dsn = "host=db1,db2,db3 port=5432,5433 dbname=pgvpn"
    assert _last_tried_last(dsn, ("db1", "5432")) == dsn
