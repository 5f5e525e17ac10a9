"""`pgvpn log` filters: only the fields that are set become conditions, each value sent once."""

from __future__ import annotations

from datetime import UTC, datetime

from pgvpn_agent import logquery


def test_only_set_fields_filter_and_values_are_named() -> None:
    q, params = logquery.query(logquery.Filter(port=0, protocol=17, limit=None))
    text = q.as_string(None)
    assert params == {"port": 0, "protocol": 17}, "port 0 is a filter, not an absent one"
    assert "(p.src_port = %(port)s OR p.dst_port = %(port)s) AND p.protocol = %(protocol)s" in text
    assert "LIMIT" not in text


def test_every_filter_and_the_limit() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    f = logquery.Filter(peer="a", src_peer="a", dst_peer="b", addr="10.0.0.0/8", port=53,
                        protocol=17, since=since, until=since, limit=5)
    q, params = logquery.query(f, payload=True)
    text = q.as_string(None)
    assert set(params) == {"peer", "src_peer", "dst_peer", "addr", "port", "protocol", "since",
                           "until", "limit"}
    # one condition per field, and every peer named for the receiver-first closed-day indexes
    assert text.count(" AND ") == 8 and text.endswith("LIMIT %(limit)s")
    assert "p.dst_peer = ANY (ARRAY(SELECT id FROM pgvpn.peer))" in text
    assert ", p.payload FROM" in text
