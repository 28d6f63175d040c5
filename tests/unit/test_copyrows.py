"""The hub's COPY row encoder: PostgreSQL's binary tuple layout, byte for byte, and its refusals."""

from __future__ import annotations

import struct

import pytest

from desanet.cython_ext._copyrows import usage_rows
from desanet.errors import StreamError

pytestmark = pytest.mark.unit


def reference(sub: list[str], columns: tuple[list[int], ...]) -> bytes:
    """The tuples as the COPY BINARY documentation lays them out (gw desa-0001, seq 7)."""
    out = b""
    for i, name in enumerate(sub):
        fields = [b"desa-0001", b"e" * 32, struct.pack(">q", 7), name.encode()]
        fields += [struct.pack(">q", v) for v in (1_000, 2_000, *(c[i] for c in columns))]
        out += struct.pack(">h", len(fields))
        out += b"".join(struct.pack(">i", len(f)) + f for f in fields)
    return out


def test_rows_are_postgresql_binary_copy_tuples() -> None:
    sub = [f"s{i:04d}" for i in range(1, 6)] + ["warung-bu-siti-é"]
    columns = tuple([k * 1000 + i for i in range(len(sub))] for k in range(6))
    columns[4][2] = 2**63 - 1  # the largest total a bigint holds
    got = usage_rows("desa-0001", "e" * 32, 7, sub, 1_000, 2_000, columns)
    assert got == reference(sub, columns)


def test_values_beyond_a_bigint_and_ragged_columns_are_refused() -> None:
    ones = [1]
    with pytest.raises(StreamError, match="up value 18446744073709551615"):
        usage_rows("g", "e", 1, ["a"], 0, 0, ([2**64 - 1], ones, ones, ones, ones, ones))
    with pytest.raises(StreamError, match="not as long as sub"):
        usage_rows("g", "e", 1, ["a", "b"], 0, 0, (ones,) * 6)
