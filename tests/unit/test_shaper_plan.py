"""Plans: the desired trees, class ids, leaf settings from the RTT, and validation errors."""

from __future__ import annotations

import pytest

from desanet.errors import ShaperError, ValidationError
from desanet.shaper.apply import upload_ifb_name
from desanet.shaper.cowmap import CowMap
from desanet.shaper.leaf import choose_leaf, codel_times_us, leaf_options
from desanet.shaper.plan import (
    QUANTUM_MAX,
    QUANTUM_MIN,
    Link,
    SubscriberPlan,
    build_plan,
    classids_for_slot,
)
from desanet.shaper.tree import MAX_SLOT

pytestmark = pytest.mark.unit

LINK = Link(down_bps=20_000_000, up_bps=5_000_000)


def sub(i: int, down: tuple[int, int] = (1_000_000, 10_000_000), up=(250_000, 2_000_000)):
    return SubscriberPlan(f"s{i:03d}", i, down[0], down[1], up[0], up[1])


def test_classids_are_stable_and_distinct_per_direction() -> None:
    assert classids_for_slot(1) == (0x10010, 0x20010)
    assert classids_for_slot(MAX_SLOT) == (0x1FFFE, 0x2FFFE)
    assert classids_for_slot(0) == (0x1000F, 0x2000F)
    with pytest.raises(ValidationError):
        classids_for_slot(MAX_SLOT + 1)


def test_tree_has_root_default_and_one_class_per_subscriber() -> None:
    plan = build_plan(LINK, [sub(1), sub(2, down=(2_000_000, 30_000_000 // 2))], leaf="pfifo")
    down = plan.down
    root = down.classes[0x10001]
    assert root.rate_bytes_ps == root.ceil_bytes_ps == 19_000_000 // 8  # 5 % headroom
    default = down.classes[0x1000F]
    assert default.parent == 0x10001 and default.ceil_bytes_ps == root.rate_bytes_ps
    s2_down, s2_up = classids_for_slot(2)
    assert down.classes[s2_down].rate_bytes_ps == 2_000_000 // 8
    assert down.classes[s2_down].ceil_bytes_ps == 15_000_000 // 8
    assert plan.up.classes[s2_up].ceil_bytes_ps == 2_000_000 // 8
    assert set(down.leaves) == {0x1000F, 0x10010, s2_down}
    assert down.leaves[s2_down].handle == (s2_down & 0xFFFF) << 16


def test_ceiling_is_clamped_to_the_shaped_link() -> None:
    plan = build_plan(LINK, [sub(1, down=(1_000_000, 20_000_000))])
    assert plan.down.classes[classids_for_slot(1)[0]].ceil_bytes_ps == 19_000_000 // 8


@pytest.mark.parametrize("rate_bps", [8_000, 256_000, 2_000_000, 100_000_000, 1_000_000_000])
def test_quantum_stays_where_the_kernel_does_not_warn(rate_bps: int) -> None:
    link = Link(2_000_000_000, 2_000_000_000)
    plan = build_plan(link, [sub(1, down=(rate_bps, rate_bps), up=(rate_bps, rate_bps))])
    for cls in plan.down.classes.values():
        assert 1000 <= QUANTUM_MIN <= cls.quantum <= QUANTUM_MAX <= 200_000
        assert cls.buffer_ticks > 0 and cls.cbuffer_ticks > 0


def test_codel_times_follow_the_rtt_and_slow_plans() -> None:
    target, interval = codel_times_us(600.0, 2_000_000 // 8)
    assert 30_000 <= target < 30_000 + 128 and 600_000 <= interval < 600_000 + 128
    target, interval = codel_times_us(100.0, 20_000_000 // 8)
    assert 5_000 <= target < 5_128 and interval == 100_096
    # 256 kbit/s: one 1514-byte packet takes 47 ms, so the target must exceed it.
    target, interval = codel_times_us(40.0, 256_000 // 8)
    assert target >= 1.5 * 47_312 and interval >= 4 * target
    for value in (target, interval):
        assert value % 128 == 0  # survives the kernel's 1.024 us units exactly


def test_leaf_settings_per_kind() -> None:
    options = dict(leaf_options("fq_codel", 250_000, 1_000_000, 600.0))
    assert options["interval"] >= 600_000 and options["ecn"] == 1
    cake = dict(leaf_options("cake", 250_000, 1_000_000, 600.0))
    assert cake["base_rate64"] == 0 and cake["rtt"] == options["interval"]
    assert 32 <= dict(leaf_options("pfifo", 250_000, 1_000_000, 600.0))["limit"] <= 1000


def test_fallback_names_what_is_missing_once() -> None:
    assert choose_leaf("fq_codel", {"fq_codel", "pfifo"}) == ("fq_codel", None)
    kind, warning = choose_leaf("fq_codel", {"pfifo"})
    assert kind == "pfifo" and warning is not None
    assert "fq_codel" in warning and "cake" in warning
    assert choose_leaf("cake", {"fq_codel", "pfifo"})[0] == "fq_codel"
    with pytest.raises(ShaperError):
        choose_leaf("pfifo", set())


@pytest.mark.parametrize(
    ("subscribers", "words"),
    [
        ([sub(1, down=(5_000_000, 2_000_000))], ["s001", "min", "max"]),
        ([sub(1, down=(1_000_000, 25_000_000))], ["s001", "above the link"]),
        ([sub(i, down=(4_000_000, 4_000_000)) for i in range(1, 6)], ["s005", "sum"]),
        ([sub(1), sub(1)], ["s001", "duplicate"]),
        ([sub(1), SubscriberPlan("s002", 1, 8, 8, 8, 8)], ["s002", "slot 1", "s001"]),
        ([SubscriberPlan("s009", MAX_SLOT + 1, 8, 8, 8, 8)], ["s009", "exhausted"]),
    ],
)
def test_validation_names_the_subscriber(subscribers: list[SubscriberPlan], words: list[str]):
    with pytest.raises(ValidationError) as err:
        build_plan(LINK, subscribers)
    for word in words:
        assert word in str(err.value)


def test_bad_rate_syntax_and_unknown_leaf() -> None:
    with pytest.raises(ValidationError, match=r"s042.*down_max"):
        SubscriberPlan.from_text("s042", 42, "1mbit", "2 furlongs", "1mbit", "1mbit")
    assert SubscriberPlan.from_text("s1", 1, "256kbit", "2mbit", "1mbit", "1mbit").down_min_bps == (
        256_000
    )
    with pytest.raises(ValidationError, match="sfq"):
        build_plan(LINK, [sub(1)], leaf="sfq")


def test_derived_plans_equal_built_plans() -> None:
    subs = [sub(i) for i in range(1, 6)]
    base = build_plan(LINK, subs[:4], leaf="pfifo")
    changed = sub(2, down=(3_000_000, 12_000_000))
    derived = base.with_subscriber(subs[4]).with_subscriber(changed).without_subscriber("s004")
    expected = build_plan(LINK, [subs[0], changed, subs[2], subs[4]], leaf="pfifo")
    for direction in ("down", "up"):
        assert derived.tree(direction).classes == expected.tree(direction).classes
        assert derived.tree(direction).leaves == expected.tree(direction).leaves
    assert derived.min_sum_bps == expected.min_sum_bps
    with pytest.raises(ValidationError, match=r"s009.*slot 1"):
        base.with_subscriber(SubscriberPlan("s009", 1, 8, 8, 8, 8))
    with pytest.raises(ValidationError, match=r"s005.*sum"):
        base.with_subscriber(sub(5, down=(16_000_000, 16_000_000)))


def test_with_leaf_keeps_classes_and_swaps_leaves() -> None:
    plan = build_plan(LINK, [sub(1)])
    swapped = plan.with_leaf("pfifo")
    assert swapped.down.classes == plan.down.classes
    assert {leaf.kind for leaf in swapped.down.leaves.values()} == {"pfifo"}
    assert swapped.leaf == "fq_codel" and swapped.leaf_in_plan() == "pfifo"


def test_cow_map_copies_are_independent() -> None:
    base: CowMap[int, str] = CowMap((i, str(i)) for i in range(1000))
    copy = base.copy()
    copy[5] = "five"
    del copy[7]
    copy[5000] = "new"
    base[9] = "nine"
    assert base[5] == "5" and 7 in base and 5000 not in base and len(base) == 1000
    assert copy[5] == "five" and 7 not in copy and copy[9] == "9" and len(copy) == 1000
    assert dict(copy.items()) == {
        **{i: str(i) for i in range(1000) if i != 7},
        5: "five",
        5000: "new",
    }
    assert copy.get(7) is None and copy == dict(copy.items())


def test_upload_ifb_names_fit_and_stay_distinct() -> None:
    assert upload_ifb_name("br-lan") == "ifb-br-lan"
    long_a, long_b = upload_ifb_name("enp0s31f6.100"), upload_ifb_name("enp0s31f6.200")
    assert len(long_a) <= 15 and len(long_b) <= 15 and long_a != long_b
