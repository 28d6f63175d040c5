# Over 400 lines: the file's rules and the slot table are the two halves of every reload; the slot
# table is what moves to its own module next.
"""The subscriber registry: the CSV file operators edit, stable slots, and the diff for hot reload.

Two optional columns may follow the eight, in either order: `mac` lists a
subscriber's device MACs (space separated): with prefixes it binds them to
those MACs, alone it makes the datapath follow the device to whatever address
it uses (DHCP, SLAAC); `radius_user` is the subscriber's RADIUS User-Name
when billing knows it by another name than its id (empty: the id).

A subscriber keeps its datapath slot for as long as it exists, across reloads
and restarts (the assignment is persisted in the state directory), so its
counters, HTB classes and billing totals never move under it. Errors name the
file, the line and the field.

Each rule is the one its owner defines: subscriber ids (desanet.validate),
prefixes and the datapath's single address space (desanet.ebpf.prefixes),
min <= max <= link (desanet.shaper.plan.rate_fault). Whether the guaranteed
rates of everyone fit the link is the shaping plan's to say, when the service
builds it from this file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from desanet.durable import replace_atomically
from desanet.ebpf.abi import MACS_PER_SUBSCRIBER, PREFIXES_PER_SUBSCRIBER
from desanet.ebpf.prefixes import format_mac, key_of, parse_mac, parse_prefix
from desanet.errors import ConfigError, StateError, ValidationError
from desanet.gateway.config import LinkConfig, decode_utf8
from desanet.meter.radius_sessions import check_user_name
from desanet.shaper.plan import RATE_FIELDS, rate_fault
from desanet.units import format_rate, parse_bytes, parse_rate_bps
from desanet.validate import check_subscriber_id

COLUMNS = ("id", "name", "prefixes", "down_min", "down_max", "up_min", "up_max", "quota")
MAC_COLUMN = "mac"  # optional, after COLUMNS
RADIUS_USER_COLUMN = "radius_user"  # optional, after COLUMNS
OPTIONAL_COLUMNS = (MAC_COLUMN, RADIUS_USER_COLUMN)


@dataclass(frozen=True)
class RatePlan:
    """Guaranteed (min) and ceiling (max) rates of one subscriber, bits per second."""

    down_min_bps: int
    down_max_bps: int
    up_min_bps: int
    up_max_bps: int

    def describe(self) -> str:
        """Short human form: "1.0-20.0 Mbit/s down, 256-5000 kbit/s up"."""
        return (
            f"{format_rate(self.down_min_bps)}..{format_rate(self.down_max_bps)} down, "
            f"{format_rate(self.up_min_bps)}..{format_rate(self.up_max_bps)} up"
        )


@dataclass(frozen=True)
class Subscriber:
    """One subscriber as the operator declared it."""

    id: str
    name: str
    prefixes: tuple[str, ...]
    plan: RatePlan
    quota_bytes: int | None
    macs: tuple[str, ...] = ()
    line: int = field(default=0, compare=False)
    radius_user: str = ""  # RADIUS User-Name; empty: the id

    @property
    def user_name(self) -> str:
        """What RADIUS names this subscriber by (User-Name)."""
        return self.radius_user or self.id


@dataclass(frozen=True)
class RegistryDiff:
    """What changed between two registries: ids added, removed, re-addressed or re-planned."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    readdressed: tuple[str, ...]
    replanned: tuple[str, ...]
    requota: tuple[str, ...]
    renamed: tuple[str, ...] = ()  # a new RADIUS User-Name

    @property
    def empty(self) -> bool:
        """True when applying this diff changes nothing."""
        changes = (self.readdressed, self.replanned, self.requota, self.renamed)
        return not (self.added or self.removed or any(changes))

    def summary(self) -> str:
        """One line for the log: "+2 -1 ~3"."""
        changed = {*self.readdressed, *self.replanned, *self.requota, *self.renamed}
        return f"+{len(self.added)} -{len(self.removed)} ~{len(changed)}"


def load_subscribers(path: str | Path, link: LinkConfig, capacity: int) -> list[Subscriber]:
    """Read and check a subscribers CSV; raises ConfigError naming file, line and field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the subscribers file: {err.strerror}") from err
    return parse_subscribers_file(raw, path, link, capacity)


def parse_subscribers_file(
    raw: bytes, path: Path, link: LinkConfig, capacity: int
) -> list[Subscriber]:
    """Check the bytes of a subscribers file: complete (ends with a newline), UTF-8, valid.

    A file cut short by a writer still at work (an editor or scp writing in
    place) usually ends inside a line, and may still parse: the newline rule
    refuses it before a single subscriber is read.
    """
    if raw and not raw.endswith(b"\n"):
        line = raw.count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: the file does not end with a newline, so it may be incomplete "
            "(still being written): end the last line with a newline, and write the file "
            "atomically (a temporary file renamed over it)"
        )
    return parse_subscribers(decode_utf8(raw, path), path, link, capacity)


def parse_subscribers(text: str, path: Path, link: LinkConfig, capacity: int) -> list[Subscriber]:
    """Check subscribers CSV text read from `path`, in file order."""
    # A spreadsheet's "CSV UTF-8" starts with a byte-order mark, not part of the header.
    reader = csv.reader(text.removeprefix("\ufeff").splitlines())
    rows = list(reader)
    header = tuple(c.strip() for c in rows[0]) if rows else ()
    columns, extra = header[: len(COLUMNS)], header[len(COLUMNS) :]
    if (
        columns != COLUMNS
        or not set(extra) <= set(OPTIONAL_COLUMNS)
        or len(set(extra)) < len(extra)
    ):
        raise ConfigError(
            f"{path}:1: header must be exactly: {','.join(COLUMNS)} (and optionally ,{MAC_COLUMN})"
            f" (and optionally ,{RADIUS_USER_COLUMN}), the optional columns in either order"
        )
    columns = header
    subscribers: list[Subscriber] = []
    first_line: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) != len(columns):
            raise ConfigError(f"{path}:{number}: expected {len(columns)} columns, found {len(row)}")
        sub = _row(dict(zip(columns, (c.strip() for c in row), strict=True)), path, number, link)
        if sub.id in first_line:
            raise ConfigError(
                f"{path}:{number}: id: subscriber {sub.id} already defined on line "
                f"{first_line[sub.id]}"
            )
        first_line[sub.id] = number
        subscribers.append(sub)
    if len(subscribers) > capacity:
        raise ConfigError(
            f"{path}: {len(subscribers)} subscribers exceed the datapath capacity of {capacity} "
            "([gateway] capacity)"
        )
    _check_overlaps(subscribers, path)
    _check_macs(subscribers, path)
    _check_user_names(subscribers, path)
    return subscribers


def _row(cells: Mapping[str, str], path: Path, number: int, link: LinkConfig) -> Subscriber:
    def fail(column: str, message: str) -> ConfigError:
        who = f"subscriber {cells['id']}: " if cells["id"] else ""
        return ConfigError(f"{path}:{number}: {column}: {who}{message}")

    sub_id = cells["id"]
    try:
        check_subscriber_id(sub_id)
    except ValidationError as err:
        raise ConfigError(f"{path}:{number}: id: {err}") from err
    prefixes = tuple(cells["prefixes"].split())
    macs = _macs(cells.get(MAC_COLUMN, ""), fail)
    radius_user = cells.get(RADIUS_USER_COLUMN, "")
    if radius_user:
        try:
            check_user_name(radius_user)
        except ValidationError as err:
            raise fail(RADIUS_USER_COLUMN, str(err)) from err
    if not prefixes and not macs:
        raise fail("prefixes", "no address or prefix given (or give the device's MAC)")
    if len(prefixes) > PREFIXES_PER_SUBSCRIBER:
        raise fail("prefixes", f"{len(prefixes)} prefixes, at most {PREFIXES_PER_SUBSCRIBER}")
    for prefix in prefixes:
        try:
            parse_prefix(prefix)
        except ValidationError as err:
            raise fail("prefixes", str(err)) from err
    rates: dict[str, int] = {}
    for column in RATE_FIELDS:
        try:
            rates[column] = parse_rate_bps(cells[column])
        except ValidationError as err:
            raise fail(column, str(err)) from err
    fault = rate_fault(rates, link.down_bps, link.up_bps)
    if fault is not None:
        raise fail(*fault)
    quota = None
    if cells["quota"]:
        try:
            quota = parse_bytes(cells["quota"])
        except ValidationError as err:
            raise fail("quota", str(err)) from err
        if quota <= 0:
            raise fail("quota", "must be above zero, or empty for no quota")
    return Subscriber(
        id=sub_id,
        name=cells["name"],
        prefixes=prefixes,
        plan=RatePlan(rates["down_min"], rates["down_max"], rates["up_min"], rates["up_max"]),
        quota_bytes=quota,
        macs=macs,
        line=number,
        radius_user=radius_user,
    )


def _macs(text: str, fail: Callable[[str, str], ConfigError]) -> tuple[str, ...]:
    macs: list[str] = []
    for item in text.split():
        try:
            mac = format_mac(parse_mac(item))
        except ValidationError as err:
            raise fail(MAC_COLUMN, str(err)) from err
        if mac in macs:
            raise fail(MAC_COLUMN, f"MAC {mac} is listed twice")
        macs.append(mac)
    if len(macs) > MACS_PER_SUBSCRIBER:
        raise fail(MAC_COLUMN, f"{len(macs)} MACs, at most {MACS_PER_SUBSCRIBER}")
    return tuple(macs)


def _check_macs(subscribers: Iterable[Subscriber], path: Path) -> None:
    owner: dict[str, Subscriber] = {}
    for sub in subscribers:
        for mac in sub.macs:
            other = owner.setdefault(mac, sub)
            if other is not sub:
                raise ConfigError(
                    f"{path}:{sub.line}: {MAC_COLUMN}: subscriber {sub.id}: MAC {mac} is already "
                    f"{other.id}'s (line {other.line})"
                )


def _check_user_names(subscribers: Iterable[Subscriber], path: Path) -> None:
    # One User-Name per subscriber: it is how a Disconnect or CoA from billing finds it.
    owner: dict[str, Subscriber] = {}
    for sub in subscribers:
        other = owner.setdefault(sub.user_name, sub)
        if other is not sub:
            column = RADIUS_USER_COLUMN if sub.radius_user else "id"
            raise ConfigError(
                f"{path}:{sub.line}: {column}: subscriber {sub.id}: RADIUS User-Name "
                f"{sub.user_name!r} is already {other.id}'s (line {other.line})"
            )


def _check_overlaps(subscribers: Iterable[Subscriber], path: Path) -> None:
    # Ranges in the datapath's one 128-bit space, where 10.0.0.1 and ::ffff:10.0.0.1 are
    # the same key. Sorted by start, a prefix overlaps an earlier one exactly when it
    # starts inside the widest range seen so far: one pass, no pairwise checks.
    entries = []
    for sub in subscribers:
        for prefix in sub.prefixes:
            length, addr = key_of(parse_prefix(prefix))
            start = int.from_bytes(addr, "big")
            entries.append((start, start | ((1 << (128 - length)) - 1), sub, prefix))
    entries.sort(key=lambda e: (e[0], -e[1]))
    widest: tuple[int, Subscriber, str] | None = None
    for start, end, sub, prefix in entries:
        if widest is not None and start <= widest[0]:
            other, other_prefix = widest[1], widest[2]
            first, second = sorted(((sub, prefix), (other, other_prefix)), key=lambda e: e[0].line)
            where = f"subscriber {second[0].id}: prefix {second[1]} overlaps"
            target = "itself" if first[0].id == second[0].id else first[0].id
            raise ConfigError(f"{path}:{second[0].line}: prefixes: {where} {first[1]} of {target}")
        if widest is None or end > widest[0]:
            widest = (end, sub, prefix)


def diff(old: Iterable[Subscriber], new: Iterable[Subscriber]) -> RegistryDiff:
    """Compare two registries by subscriber id."""
    before = {s.id: s for s in old}
    after = {s.id: s for s in new}
    common = [i for i in after if i in before]
    return RegistryDiff(
        added=tuple(i for i in after if i not in before),
        removed=tuple(i for i in before if i not in after),
        readdressed=tuple(
            i
            for i in common
            if (before[i].prefixes, before[i].macs) != (after[i].prefixes, after[i].macs)
        ),
        replanned=tuple(i for i in common if before[i].plan != after[i].plan),
        requota=tuple(i for i in common if before[i].quota_bytes != after[i].quota_bytes),
        renamed=tuple(i for i in common if before[i].user_name != after[i].user_name),
    )


@dataclass(frozen=True)
class SlotChange:
    """A proposed slot table and what it changes.

    `added`: new assignments (a reused slot's counters must be reset);
    `retired`: subscribers gone from the file, whose slots stop being steered
    but stay theirs for the grace period; `returned`: retired subscribers back
    in their own slot; `expired`: retired subscribers whose slot is free now
    (their control state is forgotten).
    """

    table: SlotTable
    added: dict[str, int] = field(default_factory=dict)
    retired: dict[str, int] = field(default_factory=dict)
    returned: dict[str, int] = field(default_factory=dict)
    expired: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SlotTable:
    """Subscriber id -> datapath slot, stable for a subscriber's life, persisted as JSON.

    A table never changes in place: `assign` computes the next one, which the
    caller adopts only once everything else about the change checked out (a
    refused reload then leaves nothing to undo). A subscriber removed from the
    file is retired, not forgotten: its slot (and with it its totals) stays
    reserved until `expire` ends its grace period, so a mistaken file followed
    by the right one loses nothing. A free slot is reused only after every
    never-used slot is taken, so a slot's counters rarely change hands (the
    aggregator resets them when they do); when every slot is taken, the
    longest-retired subscriber's slot goes first.
    """

    capacity: int
    slots: Mapping[str, int] = field(default_factory=dict)
    high_water: int = 0
    # id -> (slot, Unix ms when it left the file)
    retired: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, capacity: int) -> SlotTable:
        """The table saved at `path`, or an empty one if there is none."""
        if not path.exists():
            return cls(capacity)
        try:
            doc = json.loads(path.read_text())
            slots = {str(k): int(v) for k, v in doc["slots"].items()}
            retired = {
                str(k): (int(slot), int(since))
                for k, (slot, since) in doc.get("retired", {}).items()
            }
            return cls(capacity, slots, int(doc["high_water"]), retired)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StateError(
                f"{path}: slot table unreadable ({err}); restore it from backup, "
                "deleting it re-numbers every subscriber"
            ) from err

    def assign(self, ids: Iterable[str], now_ms: int) -> SlotChange:
        """The table giving every id a slot, retiring (at `now_ms`) the ids no longer present.

        Raises ConfigError when the ids do not fit; this table is unchanged either way.
        """
        wanted = list(ids)
        keep = set(wanted)
        slots = {i: s for i, s in self.slots.items() if i in keep}
        retired = dict(self.retired)
        newly_retired = {i: s for i, s in self.slots.items() if i not in keep}
        retired.update((i, (s, now_ms)) for i, s in newly_retired.items())
        returned = {i: retired.pop(i)[0] for i in wanted if i not in slots and i in retired}
        slots.update(returned)
        used = set(slots.values()) | {slot for slot, _ in retired.values()}
        reusable = sorted(set(range(1, self.high_water + 1)) - used, reverse=True)
        high_water = self.high_water
        added: dict[str, int] = {}
        expired: dict[str, int] = {}
        for sub_id in wanted:
            if sub_id in slots:
                continue
            if high_water < self.capacity:
                high_water += 1
                slot = high_water
            elif reusable:
                slot = reusable.pop()
            elif retired:
                oldest = min(retired, key=lambda i: retired[i][1])
                slot = retired.pop(oldest)[0]
                expired[oldest] = slot
            else:
                raise ConfigError(f"no free slot for subscriber {sub_id}: capacity {self.capacity}")
            slots[sub_id] = slot
            added[sub_id] = slot
        table = SlotTable(self.capacity, slots, high_water, retired)
        return SlotChange(table, added, newly_retired, returned, expired)

    def expire(self, now_ms: int, grace_ms: int) -> SlotChange:
        """The table without the retired subscribers whose grace period ended by `now_ms`."""
        expired = {i: s for i, (s, since) in self.retired.items() if now_ms - since >= grace_ms}
        retired = {i: r for i, r in self.retired.items() if i not in expired}
        table = SlotTable(self.capacity, self.slots, self.high_water, retired)
        return SlotChange(table, expired=expired)

    def owners(self) -> dict[int, str]:
        """Slot -> subscriber id."""
        return {slot: sub_id for sub_id, slot in self.slots.items()}

    def save(self, path: Path) -> None:
        """Write the table atomically (a crash leaves the old or the new file, never half)."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        table = {
            "high_water": self.high_water,
            "slots": dict(self.slots),
            "retired": {i: list(r) for i, r in self.retired.items()},
        }
        replace_atomically(path, json.dumps(table).encode())
