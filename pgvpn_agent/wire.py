"""PostgreSQL binary array encoding for the sender's batch columns.

psycopg dumps Python lists element by element in Python; at 12 columns x 256 packets per batch
that was the sender's largest CPU cost. Here each column is packed with one precompiled struct
call, and addresses go in as binary `inet` straight from the packet bytes, with no text detour.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache

from psycopg import adapt, postgres
from psycopg.abc import AdaptContext
from psycopg.pq import Format

_HEADER = struct.Struct("!iiIii")
POSTGRES_EPOCH = 946_684_800  # 2000-01-01 in Unix time: timestamptz counts microseconds from it

# inet binary: family (2 = IPv4, 3 = IPv6), prefix bits, is_cidr, address length, address
INET4 = b"\x02\x20\x00\x04"
INET6 = b"\x03\x80\x00\x10"


class Array:
    """A binary-encoded array; `oid` names its array type for psycopg.

    Not a bytes subclass: building one would copy the encoding again, and a column of payloads
    is up to a megabyte per batch."""

    __slots__ = ("data", "oid")

    def __init__(self, data: bytes, oid: int) -> None:
        self.data = data
        self.oid = oid


def _oid(name: str) -> int:
    return postgres.types[name].oid


OIDS = {name: _oid(name) for name in ("int2", "int4", "int8", "bool", "bytea", "inet",
                                      "timestamptz")}
ARRAY_OIDS = {name: postgres.types[name].array_oid for name in OIDS}


@lru_cache(maxsize=64)
def _fixed(code: str, size: int, n: int) -> struct.Struct:
    return struct.Struct("!" + f"i{code}" * n)


def _array(name: str, parts: list[bytes], n: int, nulls: bool = False) -> Array:
    """One copy: the header and the elements' encodings joined once."""
    parts.insert(0, _HEADER.pack(1, int(nulls), OIDS[name], n, 1))
    return Array(b"".join(parts), ARRAY_OIDS[name])


def fixed(name: str, values: Sequence[int | float]) -> Array:
    """int2/int4/int8/timestamptz(int8 microseconds) arrays without NULLs."""
    code, size = {"int2": ("h", 2), "int4": ("i", 4), "int8": ("q", 8),
                  "timestamptz": ("q", 8)}[name]
    n = len(values)
    body = _fixed(code, size, n).pack(*[x for v in values for x in (size, v)])
    return _array(name, [body], n)


def nullable_int4(values: Sequence[int | None]) -> Array:
    parts = [_NULL if v is None else _INT4.pack(4, v) for v in values]
    return _array("int4", parts, len(values), nulls=None in values)


def booleans(values: Sequence[bool]) -> Array:
    return _array("bool", [_TRUE if v else _FALSE for v in values], len(values))


def blobs(name: str, values: Sequence[bytes | None]) -> Array:
    """bytea or pre-encoded inet elements: length-prefixed (None: NULL)."""
    parts: list[bytes] = []
    nulls = False
    for v in values:
        if v is None:
            parts.append(_NULL)
            nulls = True
        else:
            parts.append(_LEN.pack(len(v)))
            parts.append(v)
    return _array(name, parts, len(values), nulls=nulls)


def timestamps(unix_seconds: Sequence[float]) -> Array:
    return fixed("timestamptz", [int((t - POSTGRES_EPOCH) * 1_000_000) for t in unix_seconds])


_INT4 = struct.Struct("!ii")
_LEN = struct.Struct("!i")
_NULL = b"\xff\xff\xff\xff"
_TRUE = b"\x00\x00\x00\x01\x01"
_FALSE = b"\x00\x00\x00\x01\x00"


class ArrayDumper(adapt.Dumper):
    format = Format.BINARY

    def dump(self, obj: Array) -> bytes:
        return obj.data

    def get_key(self, obj: Array, format: adapt.PyFormat) -> type | tuple[type, ...]:
        return (Array, obj.oid)  # type: ignore[return-value]

    def upgrade(self, obj: Array, format: adapt.PyFormat) -> adapt.Dumper:
        dumper = ArrayDumper(Array)
        dumper.oid = obj.oid
        return dumper


def register(context: AdaptContext) -> None:
    context.adapters.register_dumper(Array, ArrayDumper)
