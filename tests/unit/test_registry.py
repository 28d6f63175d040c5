"""Subscribers file checks, stable slots and the reload diff."""

from __future__ import annotations

from pathlib import Path

import pytest

from desanet.errors import ConfigError, StateError
from desanet.gateway.config import LinkConfig
from desanet.gateway.registry import SlotTable, diff, load_subscribers, parse_subscribers

pytestmark = pytest.mark.unit

LINK = LinkConfig(down_bps=20_000_000, up_bps=5_000_000)
HEADER = "id,name,prefixes,down_min,down_max,up_min,up_max,quota\n"
ROWS = [
    "s1,Ibu Sari,10.77.0.10 fd77::11,1mbit,20mbit,256kbit,5mbit,50GB",
    "s2,Pak Budi,10.77.1.0/24,1mbit,2mbit,256kbit,512kbit,",
    "s3,Warung,10.77.0.12,2mbit,10mbit,512kbit,2mbit,10GB",
]


def parse(rows: list[str], capacity: int = 100) -> list:
    return parse_subscribers(HEADER + "\n".join(rows) + "\n", Path("subs.csv"), LINK, capacity)


def test_good_file_parses() -> None:
    subs = parse(ROWS)
    assert [s.id for s in subs] == ["s1", "s2", "s3"]
    assert subs[0].prefixes == ("10.77.0.10", "fd77::11")
    assert subs[0].plan.down_max_bps == 20_000_000 and subs[1].plan.up_max_bps == 512_000
    assert subs[0].quota_bytes == 50 * 10**9 and subs[1].quota_bytes is None
    assert subs[2].line == 4


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "s4,X,10.77.0.300,1mbit,2mbit,1mbit,1mbit,",
            r"subs.csv:5: prefixes: subscriber s4: '10.77.0.300' is not an IPv4/IPv6 address",
        ),
        (
            "s4,X,10.77.0.0/8,1mbit,2mbit,1mbit,1mbit,",
            r":5: prefixes: subscriber s4: prefix 10.77.0.0/8 has host bits set: did you mean "
            r"10.0.0.0/8\?",
        ),
        ("s4,X,,1mbit,2mbit,1mbit,1mbit,", r":5: prefixes: subscriber s4: no address"),
        ("s4,X,10.9.0.1,1mbit,2mbitz,1mbit,1mbit,", r":5: down_max: subscriber s4: rate '2mbitz'"),
        ("s4,X,10.9.0.1,3mbit,2mbit,1mbit,1mbit,", r":5: down_min: subscriber s4: 3.0 Mbit/s is"),
        ("s4,X,10.9.0.1,1mbit,2mbit,1mbit,6mbit,", r":5: up_max: .* above the link's 5.0 Mbit/s"),
        ("s4,X,10.9.0.1,1mbit,2mbit,1mbit,1mbit,lots", r":5: quota: subscriber s4: size 'lots'"),
        ("s4,X,10.9.0.1,1mbit,2mbit,1mbit,1mbit,0", r":5: quota: .*above zero"),
        ("s 4,X,10.9.0.1,1mbit,2mbit,1mbit,1mbit,", r":5: id: 's 4': a subscriber id is letters"),
        ("s4,X,10.9.0.1,1mbit,2mbit,4bit,1mbit,", r":5: up_min: subscriber s4: 4 bit/s is below 8"),
        (
            "s2,X,10.9.0.1,1mbit,2mbit,1mbit,1mbit,",
            r":5: id: subscriber s2 already defined on line 3",
        ),
        ("s4,X,10.9.0.1,1mbit,2mbit,1mbit", r":5: expected 8 columns, found 6"),
        (
            "s4,X,10.77.1.7,1mbit,2mbit,1mbit,1mbit,",
            r":5: prefixes: subscriber s4: prefix 10.77.1.7 overlaps 10.77.1.0/24 of s2",
        ),
        (
            "s4,X,10.1.0.1 10.1.0.1,1mbit,2mbit,1mbit,1mbit,",
            r":5: prefixes: subscriber s4: prefix 10.1.0.1 overlaps 10.1.0.1 of itself",
        ),
        (
            # One address space, as in the datapath: an IPv4-mapped address is the IPv4 one.
            "s4,X,::ffff:10.77.0.10,1mbit,2mbit,1mbit,1mbit,",
            r":5: prefixes: subscriber s4: prefix ::ffff:10.77.0.10 overlaps 10.77.0.10 of s1",
        ),
    ],
)
def test_each_error_names_line_field_and_subscriber(row: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse([*ROWS, row])


def test_header_and_capacity() -> None:
    with pytest.raises(ConfigError, match=r"subs.csv:1: header must be exactly"):
        parse_subscribers("id,name\n", Path("subs.csv"), LINK, 10)
    with pytest.raises(ConfigError, match=r"3 subscribers exceed the datapath capacity of 2"):
        parse(ROWS, capacity=2)


def test_comments_and_blank_lines_are_skipped() -> None:
    subs = parse(["# a comment", ROWS[0], "", ROWS[1]])
    assert [s.id for s in subs] == ["s1", "s2"] and subs[1].line == 5


def test_diff_names_each_kind_of_change() -> None:
    old = parse(ROWS)
    new = parse(
        [
            ROWS[0].replace("fd77::11", "fd77::12"),
            ROWS[1].replace("2mbit,256kbit", "3mbit,256kbit"),
            "s5,New,10.77.0.99,1mbit,2mbit,256kbit,512kbit,1GB",
        ]
    )
    d = diff(old, new)
    assert d.added == ("s5",) and d.removed == ("s3",)
    assert d.readdressed == ("s1",) and d.replanned == ("s2",) and d.requota == ()
    assert d.summary() == "+1 -1 ~2"
    assert diff(old, old).empty


T0 = 1_779_000_000_000
DAY_MS = 86_400_000


def test_slots_are_stable_persisted_and_reused_last(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    table = SlotTable.load(path, capacity=4)
    change = table.assign(["a", "b", "c"], T0)
    assert change.added == {"a": 1, "b": 2, "c": 3} and change.retired == {}
    change.table.save(path)
    again = SlotTable.load(path, capacity=4)
    change = again.assign(["c", "a", "d"], T0 + 1000)
    assert change.added == {"d": 4} and change.retired == {"b": 2}
    assert change.table.slots == {"a": 1, "c": 3, "d": 4}
    assert change.table.retired == {"b": (2, T0 + 1000)}
    # Every slot is taken: the longest-retired subscriber's slot goes to the newcomer.
    change = change.table.assign(["c", "a", "d", "e"], T0 + 2000)
    assert change.added == {"e": 2} and change.expired == {"b": 2}
    with pytest.raises(ConfigError, match="no free slot for subscriber f"):
        change.table.assign(["a", "c", "d", "e", "f"], T0 + 3000)
    # A table never changes in place: a refused or abandoned change leaves nothing to undo.
    assert change.table.slots == {"a": 1, "c": 3, "d": 4, "e": 2}
    assert again.slots == {"a": 1, "b": 2, "c": 3} and again.high_water == 3
    assert SlotTable.load(path, capacity=4) == again


def test_a_removed_subscriber_keeps_its_slot_for_the_grace_period(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    table = SlotTable.load(path, capacity=8).assign(["a", "b", "c"], T0).table
    gone = table.assign(["a", "c"], T0 + DAY_MS)
    gone.table.save(path)
    kept = SlotTable.load(path, capacity=8)
    assert kept.retired == {"b": (2, T0 + DAY_MS)} and kept.slots == {"a": 1, "c": 3}
    # A newcomer never takes a retired slot while others are free; b comes back to its own.
    back = kept.assign(["a", "b", "c", "d"], T0 + 2 * DAY_MS)
    assert back.added == {"d": 4} and back.returned == {"b": 2} and back.table.retired == {}
    # Seven days after it left, b is forgotten and its slot free (reused after new ones).
    assert kept.expire(T0 + 8 * DAY_MS - 1, 7 * DAY_MS).expired == {}
    expired = kept.expire(T0 + 8 * DAY_MS, 7 * DAY_MS)
    assert expired.expired == {"b": 2} and expired.table.retired == {}
    later = expired.table.assign(["a", "c", "b"], T0 + 9 * DAY_MS)
    assert later.added == {"b": 4} and later.returned == {}


def test_an_unreadable_slot_table_stops_with_the_file_named(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    path.write_text('{"high_water": 3, "slots": {"a": 1')
    with pytest.raises(StateError, match=rf"{path}: slot table unreadable"):
        SlotTable.load(path, capacity=4)


def test_a_spreadsheets_byte_order_mark_is_read_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "subs.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + ROWS[0] + "\n").encode())
    assert [s.id for s in load_subscribers(path, LINK, 10)] == ["s1"]
    path.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + "s1,Andr\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{path}:2: the file does not end with a newline"):
        load_subscribers(path, LINK, 10)
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "s1,Andr\xe9\n").encode("latin-1"))
    offset = 3 + len(HEADER) + len("s1,Andr")  # counted in the file, mark included
    with pytest.raises(ConfigError, match=rf"{path}:2: byte {offset} is not UTF-8"):
        load_subscribers(path, LINK, 10)


def test_a_file_cut_inside_its_last_line_is_refused(tmp_path: Path) -> None:
    # 50GB cut to 5 still parses as a quota: only the missing newline tells.
    path = tmp_path / "subs.csv"
    path.write_text(HEADER + ROWS[1] + "\n" + ROWS[0][:-3])
    with pytest.raises(ConfigError, match=rf"{path}:3: the file does not end with a newline"):
        load_subscribers(path, LINK, 10)
    path.write_text(HEADER + ROWS[1] + "\r\n" + ROWS[0] + "\r\n")
    assert [s.id for s in load_subscribers(path, LINK, 10)] == ["s2", "s1"]


def test_a_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "subs.csv"
    path.write_bytes(
        (HEADER + "s1,Pak Andr\xe9,10.77.0.10,1mbit,2mbit,1mbit,1mbit,\n").encode("latin-1")
    )
    with pytest.raises(ConfigError, match=rf"{path}:2: byte 66 is not UTF-8"):
        load_subscribers(path, LINK, 10)


def parse_text(text: str) -> list:
    return parse_subscribers(text, Path("subs.csv"), LINK, 100)


def test_the_radius_user_column_names_subscribers_for_radius() -> None:
    header = HEADER.replace("quota", "quota,radius_user")
    subs = parse_text(header + ROWS[0] + ",rt05-budi@desa\n" + ROWS[1] + ",\n")
    assert [(s.radius_user, s.user_name) for s in subs] == [
        ("rt05-budi@desa", "rt05-budi@desa"),
        ("", "s2"),  # an empty cell: RADIUS knows it by its id
    ]
    # Either order of the two optional columns; a file without them is unchanged.
    header = HEADER.replace("quota", "quota,radius_user,mac")
    both = parse_text(header + ROWS[0] + ",Ibu Sari (RT 5),02:00:00:00:00:0a\n")
    assert both[0].radius_user == "Ibu Sari (RT 5)" and both[0].macs == ("02:00:00:00:00:0a",)
    assert [s.user_name for s in parse(ROWS)] == ["s1", "s2", "s3"]
    assert all(s.radius_user == "" for s in parse(ROWS))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [ROWS[0] + ",budi", ROWS[1] + ",budi"],
            r"subs.csv:3: radius_user: subscriber s2: RADIUS User-Name 'budi' is already s1's "
            r"\(line 2\)",
        ),
        (
            # Another subscriber's id is its User-Name: taking it would make a CoA ambiguous.
            [ROWS[0] + ",", ROWS[1] + ",s1"],
            r"subs.csv:3: radius_user: subscriber s2: RADIUS User-Name 's1' is already s1's",
        ),
        (
            [ROWS[0] + ",s2", ROWS[1] + ","],
            r"subs.csv:3: id: subscriber s2: RADIUS User-Name 's2' is already s1's \(line 2\)",
        ),
        (
            [ROWS[0] + "," + "x" * 254],
            r"subs.csv:2: radius_user: subscriber s1: a RADIUS User-Name is 1 to 253 bytes",
        ),
        (
            # 127 two-byte letters: 254 bytes, over the attribute's limit.
            [ROWS[0] + "," + "é" * 127],
            r"subs.csv:2: radius_user: subscriber s1: a RADIUS User-Name is 1 to 253 bytes "
            r"of UTF-8, 254 given",
        ),
        (
            [ROWS[0] + ',"bu\tdi"'],
            r"subs.csv:2: radius_user: subscriber s1: 'bu\\tdi': a RADIUS User-Name has no "
            r"control characters",
        ),
        ([ROWS[0]], r"subs.csv:2: expected 9 columns, found 8"),
    ],
)
def test_radius_user_errors_name_line_and_subscriber(rows: list[str], message: str) -> None:
    header = HEADER.replace("quota", "quota,radius_user")
    with pytest.raises(ConfigError, match=message):
        parse_text(header + "\n".join(rows) + "\n")


def test_a_header_with_an_unknown_or_repeated_optional_column_is_refused() -> None:
    for extra in ("radius_users", "mac,mac", "radius_user,radius_user", "radius_user,mac,x"):
        header = HEADER.replace("quota", f"quota,{extra}")
        with pytest.raises(ConfigError, match=r"subs.csv:1: header must be exactly: .*radius_user"):
            parse_text(header)


def test_a_new_radius_user_is_a_change_the_reload_applies() -> None:
    header = HEADER.replace("quota", "quota,radius_user")
    old = parse_text(header + ROWS[0] + ",\n" + ROWS[1] + ",budi\n")
    new = parse_text(header + ROWS[0] + ",sari\n" + ROWS[1] + ",budi\n")
    change = diff(old, new)
    assert change.renamed == ("s1",) and not change.empty
    assert change.summary() == "+0 -0 ~1"
    # The same names written differently (no column, or an empty cell) are no change.
    assert diff(parse(ROWS[:1]), parse_text(header + ROWS[0] + ",\n")).empty
