"""The subscriber registry: the CSV file operators edit, stable slots, and the diff for hot reload.

A subscriber keeps its datapath slot for as long as it exists, across reloads
and restarts (the assignment is persisted in the state directory), so its
counters, HTB classes and billing totals never move under it. Errors name the
file, the line and the field.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from desanet.durable import replace_atomically
from desanet.ebpf.abi import PREFIXES_PER_SUBSCRIBER
from desanet.errors import ConfigError, StateError, ValidationError
from desanet.gateway.config import LinkConfig
from desanet.units import format_rate, parse_bytes, parse_rate_bps

COLUMNS = ("id", "name", "prefixes", "down_min", "down_max", "up_min", "up_max", "quota")
_SUBSCRIBER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class RegistryDiff:
    """What changed between two registries: ids added, removed, re-addressed or re-planned."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    readdressed: tuple[str, ...]
    replanned: tuple[str, ...]
    requota: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """True when applying this diff changes nothing."""
        return not (
            self.added or self.removed or self.readdressed or self.replanned or self.requota
        )

    def summary(self) -> str:
        """One line for the log: "+2 -1 ~3"."""
        changed = set(self.readdressed) | set(self.replanned) | set(self.requota)
        return f"+{len(self.added)} -{len(self.removed)} ~{len(changed)}"


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as err:
        raise ValidationError(
            f"prefix {text!r} is not an IPv4/IPv6 address or prefix ({err})"
        ) from err


def load_subscribers(path: str | Path, link: LinkConfig, capacity: int) -> list[Subscriber]:
    """Read and check a subscribers CSV; raises ConfigError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the subscribers file: {err.strerror}") from err
    return parse_subscribers(text, path, link, capacity)


def parse_subscribers(text: str, path: Path, link: LinkConfig, capacity: int) -> list[Subscriber]:
    """Check subscribers CSV text read from `path`, in file order."""
    reader = csv.reader(text.splitlines())
    rows = list(reader)
    if not rows or tuple(c.strip() for c in rows[0]) != COLUMNS:
        raise ConfigError(f"{path}:1: header must be exactly: {','.join(COLUMNS)}")
    subscribers: list[Subscriber] = []
    first_line: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) != len(COLUMNS):
            raise ConfigError(f"{path}:{number}: expected {len(COLUMNS)} columns, found {len(row)}")
        sub = _row(dict(zip(COLUMNS, (c.strip() for c in row), strict=True)), path, number, link)
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
    for direction, limit in (("down", link.down_bps), ("up", link.up_bps)):
        total = sum(getattr(s.plan, f"{direction}_min_bps") for s in subscribers)
        if total > limit:
            raise ConfigError(
                f"{path}: {direction}_min: the guaranteed rates add up to {format_rate(total)}, "
                f"above the link's {format_rate(limit)}"
            )
    return subscribers


def _row(cells: Mapping[str, str], path: Path, number: int, link: LinkConfig) -> Subscriber:
    def fail(column: str, message: str) -> ConfigError:
        who = f"subscriber {cells['id']}: " if cells["id"] else ""
        return ConfigError(f"{path}:{number}: {column}: {who}{message}")

    sub_id = cells["id"]
    if not _SUBSCRIBER_ID.match(sub_id):
        raise ConfigError(
            f"{path}:{number}: id: {sub_id!r} is not an id (letters, digits, '_', '.', '-'; max 64)"
        )
    prefixes = tuple(cells["prefixes"].split())
    if not prefixes:
        raise fail("prefixes", "no address or prefix given")
    if len(prefixes) > PREFIXES_PER_SUBSCRIBER:
        raise fail("prefixes", f"{len(prefixes)} prefixes, at most {PREFIXES_PER_SUBSCRIBER}")
    for prefix in prefixes:
        try:
            _network(prefix)
        except ValidationError as err:
            raise fail("prefixes", str(err)) from err
    rates: dict[str, int] = {}
    for column in ("down_min", "down_max", "up_min", "up_max"):
        try:
            rates[column] = parse_rate_bps(cells[column])
        except ValidationError as err:
            raise fail(column, str(err)) from err
    for direction, limit in (("down", link.down_bps), ("up", link.up_bps)):
        low, high = rates[f"{direction}_min"], rates[f"{direction}_max"]
        if low > high:
            raise fail(
                f"{direction}_min",
                f"{format_rate(low)} is above {direction}_max {format_rate(high)}",
            )
        if high > limit:
            raise fail(
                f"{direction}_max", f"{format_rate(high)} is above the link's {format_rate(limit)}"
            )
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
        line=number,
    )


def _check_overlaps(subscribers: Iterable[Subscriber], path: Path) -> None:
    # Sorted by start address, a prefix overlaps an earlier one exactly when it
    # starts inside the widest range seen so far: one pass, no pairwise checks.
    entries = sorted(
        (
            (net.version, int(net.network_address), int(net.broadcast_address), sub, prefix)
            for sub in subscribers
            for prefix in sub.prefixes
            for net in (_network(prefix),)
        ),
        key=lambda e: (e[0], e[1], -e[2]),
    )
    widest: tuple[int, int, Subscriber, str] | None = None
    for version, start, end, sub, prefix in entries:
        if widest is not None and widest[0] == version and start <= widest[1]:
            other, other_prefix = widest[2], widest[3]
            first, second = sorted(((sub, prefix), (other, other_prefix)), key=lambda e: e[0].line)
            where = f"subscriber {second[0].id}: prefix {second[1]} overlaps"
            target = "itself" if first[0].id == second[0].id else first[0].id
            raise ConfigError(f"{path}:{second[0].line}: prefixes: {where} {first[1]} of {target}")
        if widest is None or widest[0] != version or end > widest[1]:
            widest = (version, end, sub, prefix)


def diff(old: Iterable[Subscriber], new: Iterable[Subscriber]) -> RegistryDiff:
    """Compare two registries by subscriber id."""
    before = {s.id: s for s in old}
    after = {s.id: s for s in new}
    common = [i for i in after if i in before]
    return RegistryDiff(
        added=tuple(i for i in after if i not in before),
        removed=tuple(i for i in before if i not in after),
        readdressed=tuple(i for i in common if before[i].prefixes != after[i].prefixes),
        replanned=tuple(i for i in common if before[i].plan != after[i].plan),
        requota=tuple(i for i in common if before[i].quota_bytes != after[i].quota_bytes),
    )


@dataclass(frozen=True)
class SlotChange:
    """A proposed slot table and what it changes: new assignments and freed ones."""

    table: SlotTable
    added: dict[str, int]
    freed: dict[str, int]


@dataclass(frozen=True)
class SlotTable:
    """Subscriber id -> datapath slot, stable for a subscriber's life, persisted as JSON.

    A table never changes in place: `assign` computes the next one, which the
    caller adopts only once everything else about the change checked out (a
    refused reload then leaves nothing to undo). A freed slot is reused only
    after every never-used slot is taken, so a slot's counters rarely change
    hands (the aggregator resets them when they do).
    """

    capacity: int
    slots: Mapping[str, int] = field(default_factory=dict)
    high_water: int = 0

    @classmethod
    def load(cls, path: Path, capacity: int) -> SlotTable:
        """The table saved at `path`, or an empty one if there is none."""
        if not path.exists():
            return cls(capacity)
        try:
            doc = json.loads(path.read_text())
            slots = {str(k): int(v) for k, v in doc["slots"].items()}
            return cls(capacity, slots, int(doc["high_water"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StateError(
                f"{path}: slot table unreadable ({err}); restore it from backup, "
                "deleting it re-numbers every subscriber"
            ) from err

    def assign(self, ids: Iterable[str]) -> SlotChange:
        """The table giving every id a slot and freeing the slots of ids no longer present.

        Raises ConfigError when the ids do not fit; this table is unchanged either way.
        """
        wanted = list(ids)
        keep = set(wanted)
        slots = {i: s for i, s in self.slots.items() if i in keep}
        freed = {i: s for i, s in self.slots.items() if i not in keep}
        used = set(slots.values())
        reusable = sorted(set(range(1, self.high_water + 1)) - used, reverse=True)
        high_water = self.high_water
        added: dict[str, int] = {}
        for sub_id in wanted:
            if sub_id in slots:
                continue
            if high_water < self.capacity:
                high_water += 1
                slot = high_water
            elif reusable:
                slot = reusable.pop()
            else:
                raise ConfigError(f"no free slot for subscriber {sub_id}: capacity {self.capacity}")
            slots[sub_id] = slot
            added[sub_id] = slot
        return SlotChange(SlotTable(self.capacity, slots, high_water), added, freed)

    def owners(self) -> dict[int, str]:
        """Slot -> subscriber id."""
        return {slot: sub_id for sub_id, slot in self.slots.items()}

    def save(self, path: Path) -> None:
        """Write the table atomically (a crash leaves the old or the new file, never half)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {"high_water": self.high_water, "slots": dict(self.slots)}
        replace_atomically(path, json.dumps(table).encode())
