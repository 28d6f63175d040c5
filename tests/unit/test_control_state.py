"""Durable control state: damage stops the service naming the file; old journals migrate once."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from desanet.errors import StateError
from desanet.gateway.control_record import SubscriberControl
from desanet.gateway.control_state import ControlState
from desanet.gateway.registry import RatePlan

pytestmark = pytest.mark.unit

BLOCKED = SubscriberControl(suspended="block", period="2026-05", period_base=7_000)
REPLANNED = SubscriberControl(
    plan=RatePlan(1_000_000, 3_000_000, 256_000, 1_000_000),
    quota_overridden=True,
    quota_bytes=None,
    period="2026-05",
    period_base=123_456,
    throttled=True,
)


def saved(tmp_path: Path) -> Path:
    state = ControlState(tmp_path)
    state.open()
    state.update({"s1": REPLANNED, "s2": BLOCKED})
    state.close()
    return tmp_path / "control.sqlite"


def test_records_read_back_exactly(tmp_path: Path) -> None:
    saved(tmp_path)
    assert ControlState(tmp_path).records == {"s1": REPLANNED, "s2": BLOCKED}


def test_a_changed_value_stops_with_the_file_named(tmp_path: Path) -> None:
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    # s2's suspension: "block" becomes "blocc", a value SQLite itself reads happily.
    where = data.index(b"block")
    data[where + 4] = ord("c")
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match=rf"{path}: the control state is damaged .*'s2'"):
        ControlState(tmp_path)


@pytest.mark.parametrize("damage", ["garbage header", "truncated", "zeroed page"])
def test_a_damaged_file_stops_with_the_file_named(tmp_path: Path, damage: str) -> None:
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "garbage header":
        data[:16] = b"not a database!!"
    elif damage == "truncated":
        # Keep the header (it says how many pages there are) and lose the rest.
        data = data[:200]
    else:
        page = int.from_bytes(data[16:18], "big")
        data[page : 2 * page] = bytes(page)
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match=rf"{path}: the control state is damaged"):
        ControlState(tmp_path)


def legacy_line(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


LEGACY_SNAPSHOT = {
    "kind": "snapshot",
    "subs": {
        "s1": {
            "plan": {
                "down_min_bps": 1_000_000,
                "down_max_bps": 3_000_000,
                "up_min_bps": 256_000,
                "up_max_bps": 1_000_000,
            },
            "suspended": None,
            "quota_override": None,
            "period": "2026-05",
            "period_base": 123_456,
            "throttled": True,
        }
    },
}
LEGACY_BLOCK = {"kind": "set", "sub": "s2", "set": {"suspended": "block"}}
LEGACY_PERIOD = {
    "kind": "set",
    "sub": "s2",
    "set": {"period": "2026-05", "period_base": 7_000, "throttled": False},
}


def test_an_old_journal_is_migrated_once(tmp_path: Path) -> None:
    journal = tmp_path / "control.journal"
    torn = legacy_line({"kind": "set", "sub": "s1", "set": {"suspended": "wall"}})[:-9]
    journal.write_bytes(
        legacy_line(LEGACY_SNAPSHOT) + legacy_line(LEGACY_BLOCK) + legacy_line(LEGACY_PERIOD) + torn
    )
    state = ControlState(tmp_path)
    assert state.records == {"s1": REPLANNED, "s2": BLOCKED}
    assert journal.exists() and not (tmp_path / "control.sqlite").exists()  # reading writes nothing
    state.open()
    state.close()
    assert not journal.exists() and (tmp_path / "control.journal.migrated").exists()
    assert ControlState(tmp_path).records == {"s1": REPLANNED, "s2": BLOCKED}


def test_damage_inside_an_old_journal_stops_the_migration(tmp_path: Path) -> None:
    journal = tmp_path / "control.journal"
    bad = bytearray(legacy_line(LEGACY_BLOCK))
    bad[-5] ^= 0x01  # a flipped bit in the middle of the file, valid records after it
    journal.write_bytes(legacy_line(LEGACY_SNAPSHOT) + bytes(bad) + legacy_line(LEGACY_PERIOD))
    with pytest.raises(StateError, match=rf"{journal}: .*line 2 of 3 fails its checksum"):
        ControlState(tmp_path)
    assert journal.read_bytes().count(b"\n") == 3  # left as it was, for the operator
