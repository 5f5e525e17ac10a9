"""send_batch() called directly by a hostile peer, with batches broken every way Hypothesis finds.

Whatever the call does, it either logs a batch an honest agent could have sent or is refused
with a documented SQLSTATE, and the log keeps its invariants: no row on another peer's link, each
of the caller's links holds exactly the sequence numbers 1..tx_seq, no tx_seq goes back, cursors
move only on links to the caller and never past what was sent, and the daily quota holds and is
charged for exactly what was logged. The connection survives every call.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.hostile import (
    COLUMNS,
    PEERS,
    ROW_COLUMNS,
    Batch,
    Cluster,
    batch,
    cluster_fixture,
    send_any,
)

pytestmark = pytest.mark.integration

DATABASE = "fuzz_send_batch"
BATCH_ROWS = 64
BATCH_BYTES = 65_536
QUOTA = 3_000_000
# Refusals: another peer's id (42501), a link moved (PV001), over quota (PV002), bad input
# (PV003), a value out of its type's range (22...), a NULL in a NOT NULL column or the same
# sequence number twice in one batch (the constraints of pgvpn.packet).
REFUSALS = {"42501", "PV001", "PV002", "PV003", "23502", "23505"}
# One sample element per array type, for arrays made one longer.
SAMPLES: dict[str, Any] = {
    "int2[]": 2, "int4[]": 1, "int8[]": 1, "timestamptz[]": datetime.now(UTC),
    "inet[]": "10.77.0.9", "bool[]": False, "bytea[]": b"\x45" + bytes(19),
}
ARRAYS = [name for name, kind in COLUMNS if kind.endswith("[]")]
KIND = dict(COLUMNS)


@dataclass(frozen=True)
class State:
    """What the superuser sees after a call."""

    others: int  # rows whose sender is not the attacker
    links: dict[tuple[int, int], int]  # tx_seq per link
    mine: dict[int, tuple[int, int, int, int]]  # per dst: rows, distinct seqs, min, max
    cursors: dict[tuple[int, int], int]
    usage: tuple[Any, int]  # (day, charged bytes)
    charged: int  # payload and offload bytes + 100 per row, over the attacker's rows today
    misdescribed: int  # the attacker's rows whose header does not describe their payload


class Fuzz:
    """The attacker's session, the superuser's, and what the attacker knows (a plain class:
    Hypothesis prints it in every failure report)."""

    def __init__(self, conn: psycopg.Connection[Any], admin: psycopg.Connection[Any],
                 ids: dict[str, int]) -> None:
        self.conn = conn
        self.admin = admin
        self.ids = ids
        self.me = ids["peer1"]
        self.tx: dict[int, int] = {}  # the attacker's links before this call
        self.quota: int | None = None  # a per-peer quota set for this call only

    def __repr__(self) -> str:
        return f"Fuzz(peer {self.me} in {DATABASE})"

    def state(self) -> State:
        q = self.admin.execute
        others = q("SELECT count(*) FROM pgvpn.packet WHERE src_peer <> %s",
                   (self.me,)).fetchone()
        links = q("SELECT src, dst, tx_seq FROM pgvpn.link").fetchall()
        mine = q("SELECT dst_peer, count(*), count(DISTINCT seq), min(seq), max(seq) "
                 "FROM pgvpn.packet WHERE src_peer = %s GROUP BY 1", (self.me,)).fetchall()
        cursors = q("SELECT src, dst, rx_seq FROM pgvpn.cursor").fetchall()
        usage = q("SELECT day, bytes FROM pgvpn.usage WHERE peer = %s", (self.me,)).fetchone()
        charged = q("SELECT coalesce(sum(octet_length(payload) + coalesce(octet_length(offload), "
                    "0) + 100), 0) FROM pgvpn.packet "
                    "WHERE src_peer = %s AND logged_at >= (now() AT TIME ZONE 'UTC')::date "
                    "AT TIME ZONE 'UTC'", (self.me,)).fetchone()
        misdescribed = q("SELECT count(*) FROM pgvpn.packet WHERE src_peer = %s AND "
                         "(family(src_addr) <> ip_version OR family(dst_addr) <> ip_version "
                         "OR octet_length(payload) - length NOT IN (0, 29))",
                         (self.me,)).fetchone()
        return State(
            misdescribed=int(misdescribed[0]) if misdescribed else -1,
            others=int(others[0]) if others else -1,
            links={(s, d): int(t) for s, d, t in links},
            mine={int(d): (int(n), int(k), int(lo), int(hi)) for d, n, k, lo, hi in mine},
            cursors={(s, d): int(r) for s, d, r in cursors},
            usage=(usage[0], int(usage[1])) if usage else (None, 0),
            charged=int(charged[0]) if charged else 0,
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from cluster_fixture()


@pytest.fixture(scope="module")
def fuzz(cluster: Cluster) -> Iterator[Fuzz]:
    """A migrated copy of the v10 template, with small limits so floods are cheap to make."""
    cluster.copy(DATABASE)
    try:
        cluster.migrate(DATABASE)
        admin = cluster.connect(DATABASE)
        admin.execute("UPDATE pgvpn.limits SET batch_rows = %s, batch_bytes = %s, "
                      "peer_bytes_per_day = %s", (BATCH_ROWS, BATCH_BYTES, QUOTA))
        with cluster.connect(DATABASE, "pgvpn_peer1") as conn, admin:
            yield Fuzz(conn, admin, cluster.ids)
    finally:
        cluster.drop(DATABASE)


def honest(f: Fuzz, data: st.DataObject, tx: dict[int, int]) -> Batch:
    """A batch the agent could send: 0-5 rows per link, continuing each link's sequence."""
    rows: list[tuple[int, int]] = []
    for name in PEERS:
        dst = f.ids[name]
        if dst != f.me:
            n = data.draw(st.integers(0, 5), label=f"rows to {name}")
            rows += [(dst, tx[dst] + i) for i in range(1, n + 1)]
    b = batch(f.me, rows)
    b["r_payload"] = [data.draw(st.binary(min_size=1, max_size=300), label="payload")
                      for _ in rows]
    b["r_length"] = [len(p) for p in b["r_payload"]]  # the header describes the payload
    return b


def mutate(f: Fuzz, data: st.DataObject, b: Batch) -> Batch:
    """One way a hostile peer breaks a batch (earlier mutations may have broken it already)."""
    ids = [*f.ids.values(), 0, 99, -1, 32767]
    how = data.draw(st.sampled_from([
        "p_src", "l_dst", "l_span", "r_dst", "r_seq", "duplicate", "shorter", "longer",
        "null_array", "null_element", "nested", "flood_rows", "flood_bytes", "cursors",
        "notify", "reorder", "tight_quota", "replay", "offload", "length", "family",
    ]), label="mutation")

    def pick(col: str) -> int | None:
        """An index into array `col`, if it is a non-empty flat list."""
        values = b[col]
        if not isinstance(values, list) or not values or isinstance(values[0], list):
            return None
        return data.draw(st.integers(0, len(values) - 1))

    def near(value: Any) -> st.SearchStrategy[int | None]:
        base = value if isinstance(value, int) else 0
        return st.one_of(st.none(), st.integers(-3, 3).map(lambda d: base + d),
                         st.integers(-(2**63), 2**63 - 1))

    rows = [b[col] for col in ROW_COLUMNS]
    n = min(len(r) if isinstance(r, list) else 0 for r in rows)
    if how == "p_src":
        b["p_src"] = data.draw(st.sampled_from([*ids, None, 40000]))
    elif how == "l_dst" and (i := pick("l_dst")) is not None:
        b["l_dst"][i] = data.draw(st.sampled_from([*ids, None]))
    elif how == "l_span":
        key = data.draw(st.sampled_from(["l_first", "l_last"]))
        if (i := pick(key)) is not None:
            b[key][i] = data.draw(near(b[key][i]))
    elif how == "r_dst" and (i := pick("r_dst")) is not None:
        b["r_dst"][i] = data.draw(st.sampled_from(ids))
    elif how == "r_seq" and (i := pick("r_seq")) is not None:
        b["r_seq"][i] = data.draw(near(b["r_seq"][i]))
    elif how in ("duplicate", "reorder") and n > 1 and all(isinstance(r, list) for r in rows):
        if how == "duplicate":
            i = data.draw(st.integers(0, n - 1))
            for col in ROW_COLUMNS:
                b[col].append(copy.deepcopy(b[col][i]))
        else:
            order = data.draw(st.permutations(range(n)))
            for col in ROW_COLUMNS:
                b[col] = [b[col][i] for i in order] + b[col][n:]
    elif how in ("shorter", "longer", "null_array", "null_element", "nested"):
        col = data.draw(st.sampled_from(ARRAYS))
        values = b[col]
        if how == "null_array":
            b[col] = None
        elif not isinstance(values, list):
            pass
        elif how == "shorter" and values:
            values.pop()
        elif how == "longer":
            values.append(SAMPLES[KIND[col]])
        elif how == "null_element" and (i := pick(col)) is not None:
            values[i] = None
        elif how == "nested" and values:
            b[col] = [list(values), list(values)]
    elif how == "flood_rows":
        dst = f.ids["peer2"]
        first = f.tx[dst] + 1
        count = BATCH_ROWS + data.draw(st.integers(1, 100))
        b.update(batch(f.me, [(dst, first + i) for i in range(count)]))
    elif how == "flood_bytes" and (i := pick("r_payload")) is not None:
        b["r_payload"][i] = b"\x45" + bytes(BATCH_BYTES)
    elif how == "length" and (i := pick("r_length")) is not None:
        # a header that hides the payload's size from the log's byte counts
        b["r_length"][i] = data.draw(st.integers(-5, 70_000), label="length")
    elif how == "family" and (i := pick("r_version")) is not None:
        b["r_version"][i] = 10 - b["r_version"][i] if b["r_version"][i] in (4, 6) else 4
    elif how == "offload" and (i := pick("r_offload")) is not None:
        # storage beside the payload: a header a kernel would never hand over
        b["r_offload"][i] = bytes(data.draw(st.integers(0, 200_000), label="offload bytes"))
    elif how == "cursors":
        srcs = data.draw(st.lists(st.sampled_from(ids), max_size=4))
        b["c_src"] = srcs
        b["c_last"] = [data.draw(st.integers(-5, 2**40)) for _ in srcs]
    elif how == "replay":
        # the same batch again, or shifted back over sequence numbers already logged
        back = data.draw(st.integers(0, 3))
        for col in ("l_first", "l_last", "r_seq"):
            if isinstance(b[col], list):
                b[col] = [v - back if isinstance(v, int) else v for v in b[col]]
        if back == 0:
            send_any_quietly(f, b)
    elif how == "notify":
        b["p_notify"] = None
    elif how == "tight_quota":
        # this peer's own quota, just above or below what it has used today
        used = f.state().usage[1]
        f.quota = max(0, used + data.draw(st.integers(-100, 3000)))
        f.admin.execute("UPDATE pgvpn.peer SET bytes_per_day = %s WHERE id = %s",
                        (f.quota, f.me))
    return b


def send_any_quietly(f: Fuzz, b: Batch) -> None:
    """Send `b` once, whatever comes of it: the call under test then repeats it."""
    with contextlib.suppress(psycopg.Error):
        send_any(f.conn, b)


def check(f: Fuzz, before: State, after: State) -> None:
    """The invariants every call must leave, refused or not."""
    assert after.others == before.others, "a row was logged as another peer"
    for key, tx in after.links.items():
        assert tx >= before.links[key], f"link {key} went back"
        if key[0] != f.me:
            assert tx == before.links[key], f"another peer's link {key} moved"
        else:
            rows = after.mine.get(key[1], (0, 0, 0, 0))
            expected = (tx, tx, 1, tx) if tx else (0, 0, 0, 0)
            assert rows == expected, f"link {key} holds {rows}, tx_seq {tx}"
    for (src, dst), rx in after.cursors.items():
        old = before.cursors[(src, dst)]
        if dst != f.me:
            assert rx == old, f"another peer's cursor {src}>{dst} moved"
        else:
            assert rx >= old and rx <= max(old, after.links[(src, dst)]), (
                f"cursor {src}>{dst} moved to {rx}, tx_seq {after.links[(src, dst)]}")
    assert after.usage[1] <= QUOTA, "over the daily quota"
    assert after.misdescribed == 0, "a row's header lies about its payload (the log's counts)"
    if after.usage[0] == before.usage[0] or before.usage[0] is None:
        assert after.usage[1] - before.usage[1] == after.charged - before.charged, (
            "usage does not charge what was logged")


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_send_batch_keeps_its_invariants(fuzz: Fuzz, data: st.DataObject) -> None:
    before = fuzz.state()
    fuzz.tx = {dst: seq for (src, dst), seq in before.links.items() if src == fuzz.me}
    b = honest(fuzz, data, fuzz.tx)
    try:
        for _ in range(data.draw(st.integers(0, 4), label="mutations")):
            b = mutate(fuzz, data, copy.deepcopy(b))
        try:
            send_any(fuzz.conn, b)
            event("logged")
        except psycopg.Error as exc:
            assert not fuzz.conn.closed, f"the call broke the connection: {exc}"
            state = exc.sqlstate or ""
            event(f"refused {state}")
            assert state in REFUSALS or state.startswith("22"), f"{state}: {exc}"
        assert fuzz.conn.execute("SELECT 1").fetchone() == (1,)
        after = fuzz.state()
        check(fuzz, before, after)
        if fuzz.quota is not None:
            assert after.usage[1] <= max(fuzz.quota, before.usage[1]), "over the peer's quota"
    finally:
        if fuzz.quota is not None:
            fuzz.admin.execute("UPDATE pgvpn.peer SET bytes_per_day = NULL WHERE id = %s",
                               (fuzz.me,))
            fuzz.quota = None


def test_honest_batches_still_go_through(fuzz: Fuzz) -> None:
    """The fuzzing above proves little if everything is refused: an honest batch is logged."""
    before = fuzz.state()
    tx = {dst: seq for (src, dst), seq in before.links.items() if src == fuzz.me}
    peer2 = fuzz.ids["peer2"]
    send_any(fuzz.conn, batch(fuzz.me, [(peer2, tx[peer2] + 1), (peer2, tx[peer2] + 2)]))
    after = fuzz.state()
    assert after.links[(fuzz.me, peer2)] == tx[peer2] + 2
    check(fuzz, before, after)
