# Over 400 lines: the trees and the rules that validate them change together.
"""Plans: from the link and every subscriber's rates, the desired HTB tree of each direction.

Each direction has one tree: download on the LAN interface's egress, upload
on the IFB device the datapath redirects LAN ingress to. In each tree:

- class M:1 is the root, at the link rate less the headroom, so the queue
  forms here and not in the modem;
- class M:f is the default, for traffic of no subscriber (slot 0): a small
  guaranteed rate (1 % of the root, at least 16 kbit/s), ceiling the root,
  or the link's `unmatched` ceiling when the policy bounds it (a wall rate,
  a share of the link), so traffic of nobody never borrows the whole link;
- subscriber slot s has class M:(s + 0xf), rate = its min, ceil = min(max,
  root), and a leaf qdisc whose handle major is that class minor.

Class ids depend only on the slot, so they are stable across reloads.
Validation happens here, before anything touches the kernel, and every error
names the subscriber.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from desanet.errors import ValidationError
from desanet.shaper import leaf as leafmod
from desanet.shaper.cowmap import CowMap
from desanet.shaper.tree import (
    DEFAULT_MINOR,
    DOWN_MAJOR,
    MAX_SLOT,
    ROOT_MINOR,
    SLOT_MINOR_OFFSET,
    UP_MAJOR,
    HtbClass,
    HtbRoot,
    LeafQdisc,
    Tree,
    leaf_handle,
    make_handle,
)
from desanet.units import format_rate, parse_rate_bps

DIRECTIONS = ("down", "up")
R2Q = 10
# Quantum = 10 ms at the guaranteed rate, within 1600..200000 bytes (the
# kernel warns outside 1000..200000; one MTU is the useful floor). Classes
# borrowing spare capacity take turns of one quantum each, so a short quantum
# keeps a round of turns short (8 subscribers at 1 Mbit/s: 5 ms at 19 Mbit/s),
# and the spare capacity is shared evenly among small plans and in
# proportion to the guarantee among large ones.
QUANTUM_MS = 10
QUANTUM_MIN = 1600
QUANTUM_MAX = 200_000
# Burst = 1 ms at the rate plus one MTU (tc's default), enough for HTB's
# hrtimer-driven dequeue to hold the rate. The ceiling burst of a subscriber
# class is 10 ms: a class capped at its ceiling gets a turn only once per
# round of the others' turns, and must have banked a round's worth of ceiling
# to reach its cap (with 1 ms a 2 Mbit/s cap measured 1.3 Mbit/s next to 7
# greedy neighbours). The root keeps 1 ms so the modem never sees a burst.
BURST_EXTRA_BYTES = 1600
BURST_MS = 1
CEIL_BURST_MS = 10
DEFAULT_CLASS_MIN_BPS = 16_000
UNMATCHED_MIN_BPS = 8_000  # below this a wall class cannot pass one DHCP exchange in time
PSCHED_TICK_NS = 64
DEFAULT_PRIO = 1


def classids_for_slot(slot: int) -> tuple[int, int]:
    """(download class id, upload class id) for skb->priority; slot 0 gives the default classes."""
    if slot == 0:
        minor = DEFAULT_MINOR
    elif 1 <= slot <= MAX_SLOT:
        minor = slot + SLOT_MINOR_OFFSET
    else:
        raise ValidationError(f"slot {slot} is outside the class id space 1..{MAX_SLOT}")
    return make_handle(DOWN_MAJOR, minor), make_handle(UP_MAJOR, minor)


@dataclass(frozen=True)
class Link:
    """The shared uplink: its rates in bit/s and the share kept free so the modem never queues."""

    down_bps: int
    up_bps: int
    headroom: float = 0.05
    # Ceilings of the default class (traffic of no subscriber); None: the root's.
    unmatched_down_bps: int | None = None
    unmatched_up_bps: int | None = None

    def rate_bps(self, direction: str) -> int:
        return self.down_bps if direction == "down" else self.up_bps

    def unmatched_ceil_bps(self, direction: str) -> int:
        """The ceiling of the default class: the policy's bound, never above the root."""
        bound = self.unmatched_down_bps if direction == "down" else self.unmatched_up_bps
        shaped = self.shaped_bps(direction)
        return shaped if bound is None else min(bound, shaped)

    def shaped_bps(self, direction: str) -> int:
        """The root class rate: the link less the headroom."""
        return int(self.rate_bps(direction) * (1.0 - self.headroom))


@dataclass(frozen=True)
class SubscriberPlan:
    """One subscriber's guaranteed (min) and ceiling (max) rates in bit/s, and its datapath slot."""

    id: str
    slot: int
    down_min_bps: int
    down_max_bps: int
    up_min_bps: int
    up_max_bps: int

    @classmethod
    def from_text(
        cls, id: str, slot: int, down_min: str, down_max: str, up_min: str, up_max: str
    ) -> SubscriberPlan:
        """Build from tc-style rate strings ("512kbit"); errors name the subscriber."""
        rates = []
        for what, text in (
            ("down_min", down_min),
            ("down_max", down_max),
            ("up_min", up_min),
            ("up_max", up_max),
        ):
            try:
                rates.append(parse_rate_bps(text))
            except ValidationError as err:
                raise ValidationError(f"subscriber {id}: {what}: {err}") from None
        return cls(id, slot, *rates)

    def rates_bps(self, direction: str) -> tuple[int, int]:
        if direction == "down":
            return self.down_min_bps, self.down_max_bps
        return self.up_min_bps, self.up_max_bps


RATE_FIELDS = ("down_min", "down_max", "up_min", "up_max")
MIN_RATE_BPS = 8  # one byte a second: HTB's rates are in bytes


def rate_fault(
    rates: Mapping[str, int], link_down_bps: int, link_up_bps: int
) -> tuple[str, str] | None:
    """The rule every subscriber's rates obey, per direction: 8 bit/s <= min <= max <= link.

    `rates` maps each of RATE_FIELDS to bit/s. Returns None when the rule
    holds, else (the field at fault, why), which each caller words in its own
    context (a subscribers file line, a control request, a plan).
    """
    for direction, link_bps in (("down", link_down_bps), ("up", link_up_bps)):
        low, high = rates[f"{direction}_min"], rates[f"{direction}_max"]
        for name, rate in ((f"{direction}_min", low), (f"{direction}_max", high)):
            if rate < MIN_RATE_BPS:
                return name, f"{format_rate(rate)} is below {MIN_RATE_BPS} bit/s"
        if low > high:
            return (
                f"{direction}_min",
                f"{format_rate(low)} is above {direction}_max {format_rate(high)}",
            )
        if high > link_bps:
            return (
                f"{direction}_max",
                f"{format_rate(high)} is above the link's {format_rate(link_bps)}",
            )
    return None


def _ticks(burst_bytes: int, rate_bytes_ps: int) -> int:
    return burst_bytes * 1_000_000_000 // (rate_bytes_ps * PSCHED_TICK_NS)


def htb_class(
    classid: int,
    parent: int,
    rate_bytes_ps: int,
    ceil_bytes_ps: int,
    prio: int,
    ceil_burst_ms: int = CEIL_BURST_MS,
) -> HtbClass:
    """An HTB class with quantum and bursts derived from its rates."""
    quantum = min(QUANTUM_MAX, max(QUANTUM_MIN, rate_bytes_ps * QUANTUM_MS // 1000))
    burst = rate_bytes_ps * BURST_MS // 1000 + BURST_EXTRA_BYTES
    cburst = ceil_bytes_ps * ceil_burst_ms // 1000 + BURST_EXTRA_BYTES
    return HtbClass(
        classid=classid,
        parent=parent,
        rate_bytes_ps=rate_bytes_ps,
        ceil_bytes_ps=ceil_bytes_ps,
        buffer_ticks=_ticks(burst, rate_bytes_ps),
        cbuffer_ticks=_ticks(cburst, ceil_bytes_ps),
        quantum=quantum,
        prio=prio,
    )


@lru_cache(maxsize=4096)
def _options(kind: str, rate: int, ceil: int, rtt_ms: float) -> tuple[tuple[str, int], ...]:
    return leafmod.leaf_options(kind, rate, ceil, rtt_ms)


def _leaf(kind: str, cls: HtbClass, rtt_ms: float) -> LeafQdisc:
    options = _options(kind, cls.rate_bytes_ps, cls.ceil_bytes_ps, rtt_ms)
    return LeafQdisc(leaf_handle(cls.classid), cls.classid, kind, options)


@dataclass
class ShapingPlan:
    """The desired trees of both directions, with the inputs they came from.

    `with_subscriber`/`without_subscriber` derive a new plan in time flat in
    the number of subscribers (beyond copying dicts), sharing the untouched
    classes, which lets the shaper diff a one-subscriber change cheaply;
    `derive` then `put`/`remove` does the same for a batch of changes.
    """

    link: Link
    leaf: str
    rtt_ms: float
    subscribers: CowMap[str, SubscriberPlan]
    down: Tree
    up: Tree
    min_sum_bps: dict[str, int] = field(default_factory=dict)
    slot_owner: CowMap[int, str] = field(default_factory=CowMap)
    # The plan this one was derived from and the class ids that differ from it:
    # the shaper diffs only those when `base` is what it last applied.
    base: ShapingPlan | None = None
    touched: set[int] = field(default_factory=set)
    # The adaptive link rate per direction (bit/s) where it differs from `link`'s: the
    # classes shape to it, while subscribers' rates are still checked against `link`.
    adapted_bps: dict[str, int] = field(default_factory=dict)

    def tree(self, direction: str) -> Tree:
        return self.down if direction == "down" else self.up

    def with_subscriber(self, sub: SubscriberPlan) -> ShapingPlan:
        """A copy of this plan where `sub` is added or replaces the subscriber of the same id."""
        new = self.derive()
        new.put(sub)
        return new

    def without_subscriber(self, sub_id: str) -> ShapingPlan:
        """A copy of this plan without subscriber `sub_id`."""
        new = self.derive()
        new.remove(sub_id)
        return new

    def derive(self) -> ShapingPlan:
        """A copy to change with `put` and `remove`, sharing every class they do not touch.

        Many changes on one derived plan cost one copy, and the shaper still
        diffs only the classes they touched. Never change in place a plan the
        shaper has applied: derive one.
        """
        return self._copy()

    def put(self, sub: SubscriberPlan) -> None:
        """Add `sub`, or replace the subscriber of its id, in place; unchanged if it raises."""
        self.check(sub)
        old = self.subscribers.get(sub.id)
        if old is not None:
            self._drop(old)
        self._add(sub)

    def remove(self, sub_id: str) -> None:
        """Remove subscriber `sub_id` in place."""
        old = self.subscribers.get(sub_id)
        if old is None:
            raise ValidationError(f"subscriber {sub_id}: not in the plan")
        self._drop(old)

    def check(self, sub: SubscriberPlan) -> None:
        """Raise ValidationError, naming the subscriber, if `put(sub)` would be refused."""
        holder = self.slot_owner.get(sub.slot)
        if holder is not None and holder != sub.id:
            raise ValidationError(f"subscriber {sub.id}: slot {sub.slot} is already {holder}'s")
        self._check_fits(sub, self.subscribers.get(sub.id))

    def with_leaf(self, kind: str) -> ShapingPlan:
        """The same classes with `kind` leaves (used when the kernel lacks the requested kind)."""
        leafmod.check_leaf_kind(kind)
        new = self._copy()
        for direction in DIRECTIONS:
            tree = new.tree(direction)
            tree.leaves = CowMap(
                (cid, _leaf(kind, tree.classes[cid], self.rtt_ms)) for cid in tree.leaves
            )
        new.base = None
        return new

    def _copy(self) -> ShapingPlan:
        return ShapingPlan(
            self.link,
            self.leaf,
            self.rtt_ms,
            self.subscribers.copy(),
            self.down.copy(),
            self.up.copy(),
            dict(self.min_sum_bps),
            self.slot_owner.copy(),
            base=self,
            adapted_bps=dict(self.adapted_bps),
        )

    def _scale(self, direction: str) -> float:
        adapted = self.adapted_bps.get(direction)
        return 1.0 if adapted is None else adapted / self.link.rate_bps(direction)

    def _subscriber_class(self, sub: SubscriberPlan, direction: str, scale: float) -> HtbClass:
        # HTB guarantees a class its rate whatever its parent's: under an adapted link
        # rate every guarantee shrinks with it, or their sum could exceed the link.
        major = DOWN_MAJOR if direction == "down" else UP_MAJOR
        lo, hi = sub.rates_bps(direction)
        shaped = int(self.link.shaped_bps(direction) * scale)
        return htb_class(
            make_handle(major, sub.slot + SLOT_MINOR_OFFSET),
            make_handle(major, ROOT_MINOR),
            int(lo * scale) // 8,
            min(hi, shaped) // 8,
            0,
        )

    def with_link_rate(self, direction: str, rate_bps: int) -> ShapingPlan:
        """A copy shaping `direction` to `rate_bps` (the adaptive link rate): the root and
        default classes, and every subscriber's guarantee and ceiling scaled alike, change
        in place; leaves keep the settings of the configured rates (a leaf replaced would
        lose its queue), and `link`, which subscribers' rates are checked against, stays."""
        new = self._copy()
        if rate_bps == self.link.rate_bps(direction):
            new.adapted_bps.pop(direction, None)
        else:
            new.adapted_bps[direction] = rate_bps
        scale = new._scale(direction)
        major = DOWN_MAJOR if direction == "down" else UP_MAJOR
        tree = new.tree(direction)
        shaped = int(self.link.shaped_bps(direction) * scale)
        for cls in _root_classes(self.link, direction, major, shaped):
            tree.classes[cls.classid] = cls
            new.touched.add(cls.classid)
        for sub in self.subscribers.values():
            cls = new._subscriber_class(sub, direction, scale)
            tree.classes[cls.classid] = cls
            new.touched.add(cls.classid)
        return new

    def root_rate_bps(self, direction: str) -> int:
        """The rate the `direction` root class shapes to, bit/s."""
        major = DOWN_MAJOR if direction == "down" else UP_MAJOR
        return self.tree(direction).classes[make_handle(major, ROOT_MINOR)].rate_bytes_ps * 8

    def leaf_in_plan(self) -> str:
        """The leaf kind the trees of this plan use."""
        for leaf in self.down.leaves.values():
            return leaf.kind
        return self.leaf

    def _check_fits(self, sub: SubscriberPlan, replacing: SubscriberPlan | None) -> None:
        # Both directions are checked before anything changes, so a refusal leaves no trace.
        _check_subscriber(sub, self.link)
        for direction in DIRECTIONS:
            lo = sub.rates_bps(direction)[0]
            freed = replacing.rates_bps(direction)[0] if replacing is not None else 0
            shaped = self.link.shaped_bps(direction)
            total = self.min_sum_bps[direction] - freed + lo
            if total > shaped - _default_min_bps(shaped):
                raise ValidationError(
                    f"subscriber {sub.id}: its {_NAMES[direction]} min {format_rate(lo)} brings "
                    f"the sum of guaranteed rates to {format_rate(total)}, above the "
                    f"{format_rate(shaped - _default_min_bps(shaped))} the link can guarantee "
                    f"({format_rate(self.link.rate_bps(direction))} less "
                    f"{self.link.headroom:.0%} headroom and the unmatched-traffic class)"
                )

    def _add(self, sub: SubscriberPlan) -> None:
        self._check_fits(sub, None)
        kind = self.leaf_in_plan()
        for direction in DIRECTIONS:
            self.min_sum_bps[direction] += sub.rates_bps(direction)[0]
            tree = self.tree(direction)
            configured = self._subscriber_class(sub, direction, 1.0)
            cls = self._subscriber_class(sub, direction, self._scale(direction))
            tree.classes[cls.classid] = cls
            # The leaf as at the configured rate: with_link_rate never replaces leaves.
            tree.leaves[cls.classid] = _leaf(kind, configured, self.rtt_ms)
            self.touched.add(cls.classid)
        self.subscribers[sub.id] = sub
        self.slot_owner[sub.slot] = sub.id

    def _drop(self, sub: SubscriberPlan) -> None:
        for direction, major in (("down", DOWN_MAJOR), ("up", UP_MAJOR)):
            classid = make_handle(major, sub.slot + SLOT_MINOR_OFFSET)
            tree = self.tree(direction)
            del tree.classes[classid]
            del tree.leaves[classid]
            self.touched.add(classid)
            self.min_sum_bps[direction] -= sub.rates_bps(direction)[0]
        del self.subscribers[sub.id]
        del self.slot_owner[sub.slot]


_NAMES = {"down": "download", "up": "upload"}


def _default_min_bps(shaped_bps: int) -> int:
    return max(DEFAULT_CLASS_MIN_BPS, shaped_bps // 100)


def _check_subscriber(sub: SubscriberPlan, link: Link) -> None:
    if not sub.id:
        raise ValidationError(f"subscriber in slot {sub.slot} has an empty id")
    if not 1 <= sub.slot <= MAX_SLOT:
        raise ValidationError(
            f"subscriber {sub.id}: slot {sub.slot} is outside 1..{MAX_SLOT}: "
            f"the HTB class id space is exhausted"
        )
    rates = {
        "down_min": sub.down_min_bps,
        "down_max": sub.down_max_bps,
        "up_min": sub.up_min_bps,
        "up_max": sub.up_max_bps,
    }
    fault = rate_fault(rates, link.down_bps, link.up_bps)
    if fault is not None:
        raise ValidationError(f"subscriber {sub.id}: {fault[0]}: {fault[1]}")


def _check_link(link: Link) -> None:
    if not 0.0 <= link.headroom < 0.5:
        raise ValidationError(f"link headroom {link.headroom} must be within 0 .. 0.5")
    for direction in DIRECTIONS:
        shaped = link.shaped_bps(direction)
        if shaped < 2 * _default_min_bps(shaped) or shaped // 8 >= 1 << 32:
            raise ValidationError(
                f"link {_NAMES[direction]} rate {format_rate(link.rate_bps(direction))} "
                f"is outside what the shaper supports (64 kbit/s .. 34 Gbit/s)"
            )
        if link.unmatched_ceil_bps(direction) < UNMATCHED_MIN_BPS:
            raise ValidationError(
                f"the {_NAMES[direction]} rate of traffic of no subscriber "
                f"({format_rate(link.unmatched_ceil_bps(direction))}) must be at least "
                f"{format_rate(UNMATCHED_MIN_BPS)}"
            )


def _root_classes(link: Link, direction: str, major: int, shaped: int) -> tuple[HtbClass, HtbClass]:
    """The root class at `shaped` bit/s and the default class under it."""
    root_id = make_handle(major, ROOT_MINOR)
    root_cls = htb_class(root_id, make_handle(major, 0), shaped // 8, shaped // 8, 0, BURST_MS)
    default_id = make_handle(major, DEFAULT_MINOR)
    ceil = min(link.unmatched_ceil_bps(direction), shaped)
    default_cls = htb_class(
        default_id, root_id, min(_default_min_bps(shaped), ceil) // 8, ceil // 8, DEFAULT_PRIO
    )
    return root_cls, default_cls


def _empty_tree(link: Link, direction: str, major: int, kind: str, rtt_ms: float) -> Tree:
    root_cls, default_cls = _root_classes(link, direction, major, link.shaped_bps(direction))
    root_id, default_id = root_cls.classid, default_cls.classid
    return Tree(
        root=HtbRoot(handle=make_handle(major, 0), default_minor=DEFAULT_MINOR, r2q=R2Q),
        classes=CowMap([(root_id, root_cls), (default_id, default_cls)]),
        leaves=CowMap([(default_id, _leaf(kind, default_cls, rtt_ms))]),
    )


def build_plan(
    link: Link,
    subscribers: Sequence[SubscriberPlan] | Iterable[SubscriberPlan],
    leaf: str = "fq_codel",
    rtt_ms: float = 100.0,
) -> ShapingPlan:
    """Validate the inputs and compute the desired trees of both directions."""
    leafmod.check_leaf_kind(leaf)
    if not 1.0 <= rtt_ms <= 10_000.0:
        raise ValidationError(f"path RTT {rtt_ms} ms must be within 1 ms .. 10 s")
    _check_link(link)
    plan = ShapingPlan(
        link=link,
        leaf=leaf,
        rtt_ms=rtt_ms,
        subscribers=CowMap(),
        down=_empty_tree(link, "down", DOWN_MAJOR, leaf, rtt_ms),
        up=_empty_tree(link, "up", UP_MAJOR, leaf, rtt_ms),
        min_sum_bps={"down": 0, "up": 0},
    )
    for sub in subscribers:
        if sub.id in plan.subscribers:
            raise ValidationError(f"subscriber {sub.id}: duplicate id")
        holder = plan.slot_owner.get(sub.slot)
        if holder is not None:
            raise ValidationError(f"subscriber {sub.id}: slot {sub.slot} is already {holder}'s")
        plan._add(sub)
    return plan
