"""Leaf qdiscs under subscriber classes: their settings, and the fallback for missing kinds.

fq_codel's target and interval come from the configured path RTT, not from
its 5 ms / 100 ms defaults (tuned for a 100 ms path):

- interval = the path RTT: CoDel waits one interval of standing queue before
  it drops, and a sender needs about one RTT to react to a drop; a shorter
  interval on a 600 ms GEO path drops again before the first drop could act.
- target = RTT / 20 (the 5 % ratio of the defaults), but at least the time to
  send 1.5 MTU at the class's guaranteed rate: at 256 kbit/s one 1514-byte
  packet takes 47 ms, and a target below that would drop packets that are
  merely being serialized.
- interval is stretched to 4 x target when a slow plan pushes the target up,
  so the target never exceeds a quarter of the interval.
- both are rounded up to whole 128 us steps: the kernel keeps CoDel times in
  1.024 us units, and only multiples of 128 us survive the round trip exactly,
  which keeps a re-applied unchanged plan at zero operations.

cake gets the same target and interval (its RTT setting), and no rate of its
own (0 = unlimited): HTB does the shaping. pfifo gets a limit of about one
bandwidth-delay product at the class ceiling, bounded to 32..1000 packets.
"""

from __future__ import annotations

import math

from desanet.errors import ShaperError, ValidationError

LEAF_KINDS = ("fq_codel", "cake", "pfifo")

# When the requested kind is missing, the others are tried in this order:
# flow-queueing AQMs first, pfifo (always built with the kernel) last.
_FALLBACKS = {
    "fq_codel": ("fq_codel", "cake", "pfifo"),
    "cake": ("cake", "fq_codel", "pfifo"),
    "pfifo": ("pfifo",),
}

MTU_BYTES = 1514
CODEL_STEP_US = 128
# Hash buckets per fq_codel leaf: a household has tens of flows; 64 buckets
# cost about 5 kB of kernel memory per leaf (1024, the default, ~70 kB).
FQ_CODEL_FLOWS = 64
FQ_CODEL_LIMIT_PKTS = 1024
MEMORY_MIN_BYTES = 256 * 1024
MEMORY_MAX_BYTES = 4 * 1024 * 1024
PFIFO_MIN_PKTS = 32
PFIFO_MAX_PKTS = 1000


def check_leaf_kind(kind: str) -> None:
    """Refuse an unknown leaf kind with the list of known ones."""
    if kind not in LEAF_KINDS:
        raise ValidationError(
            f"unknown leaf qdisc {kind!r}: [shaping] leaf must be one of {', '.join(LEAF_KINDS)}"
        )


def fallback_order(kind: str) -> tuple[str, ...]:
    """Kinds to try, best first, when `kind` is requested."""
    check_leaf_kind(kind)
    return _FALLBACKS[kind]


def _round_up_step(us: float) -> int:
    return max(CODEL_STEP_US, math.ceil(us / CODEL_STEP_US) * CODEL_STEP_US)


def codel_times_us(rtt_ms: float, rate_bytes_ps: int) -> tuple[int, int]:
    """(target, interval) in microseconds for a class guaranteed `rate_bytes_ps`."""
    rtt_us = rtt_ms * 1000.0
    serialize_us = 1.5 * MTU_BYTES * 1_000_000 / max(rate_bytes_ps, 1)
    target = _round_up_step(max(rtt_us / 20.0, serialize_us))
    interval = _round_up_step(max(rtt_us, 4.0 * target))
    return target, interval


def _bdp_bytes(rate_bytes_ps: int, rtt_ms: float) -> int:
    return int(rate_bytes_ps * rtt_ms / 1000.0)


def leaf_options(
    kind: str, rate_bytes_ps: int, ceil_bytes_ps: int, rtt_ms: float
) -> tuple[tuple[str, int], ...]:
    """Settings of a `kind` leaf under a class with this guaranteed rate and ceiling."""
    check_leaf_kind(kind)
    memory = min(MEMORY_MAX_BYTES, max(MEMORY_MIN_BYTES, 4 * _bdp_bytes(ceil_bytes_ps, rtt_ms)))
    if kind == "pfifo":
        packets = _bdp_bytes(ceil_bytes_ps, rtt_ms) // MTU_BYTES
        return (("limit", min(PFIFO_MAX_PKTS, max(PFIFO_MIN_PKTS, packets))),)
    target, interval = codel_times_us(rtt_ms, rate_bytes_ps)
    if kind == "cake":
        return (("base_rate64", 0), ("rtt", interval), ("target", target), ("memory", memory))
    return (
        ("target", target),
        ("interval", interval),
        ("limit", FQ_CODEL_LIMIT_PKTS),
        ("flows", FQ_CODEL_FLOWS),
        ("quantum", MTU_BYTES),
        ("ecn", 1),
        ("memory_limit", memory),
    )


def choose_leaf(requested: str, available: set[str]) -> tuple[str, str | None]:
    """The best available kind for `requested`, and the warning to show if it is another."""
    order = fallback_order(requested)
    for kind in order:
        if kind in available:
            if kind == requested:
                return kind, None
            missing = order[: order.index(kind)]
            return kind, (
                f"leaf qdisc {requested} is not available in this kernel "
                f"(missing: {', '.join(missing)}); shaping with {kind} leaves instead"
            )
    raise ShaperError(f"no leaf qdisc usable in this kernel (tried {', '.join(order)})")
