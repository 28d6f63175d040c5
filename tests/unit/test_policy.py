"""[policy] unprovisioned, the subscribers file's mac column and the slot-0 class they shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from desanet.ebpf import abi
from desanet.ebpf.datapath import Provision
from desanet.errors import ConfigError, ValidationError
from desanet.gateway.config import LinkConfig, parse_config
from desanet.gateway.plans import provision_entry, shaping_plan, unmatched_bounds_bps
from desanet.gateway.registry import diff, parse_subscribers
from desanet.shaper.plan import Link, build_plan
from desanet.shaper.tree import DEFAULT_MINOR, DOWN_MAJOR, UP_MAJOR, make_handle

pytestmark = pytest.mark.unit

CONFIG = """\
[gateway]
id = "desa-sukamaju"
lan = "br-lan"
state_dir = "state"

[link]
down = "20mbit"
up = "5mbit"

[publish]
usage = "tcp://127.0.0.1:7570"
replay = "tcp://127.0.0.1:7571"
plaintext = true

[subscribers]
file = "subscribers.csv"
"""
LINK = LinkConfig(down_bps=20_000_000, up_bps=5_000_000)
HEADER = "id,name,prefixes,down_min,down_max,up_min,up_max,quota,mac\n"


def config(policy: str = "") -> object:
    return parse_config(CONFIG + policy, Path("/etc/desanet/gateway.toml"))


def subscribers(*rows: str) -> list:
    return parse_subscribers(HEADER + "\n".join(rows) + "\n", Path("subs.csv"), LINK, 100)


def test_unprovisioned_traffic_is_blocked_unless_configured() -> None:
    cfg = config()
    assert cfg.policy.unprovisioned == "block"  # type: ignore[attr-defined]
    walled = config(
        '\n[policy]\nunprovisioned = "wall"\nwall_down = "128kbit"\nwall_up = "64kbit"\n'
    )
    assert walled.policy.unprovisioned == "wall"  # type: ignore[attr-defined]
    assert (walled.policy.wall_down_bps, walled.policy.wall_up_bps) == (128_000, 64_000)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ('unprovisioned = "open"', r":19: \[policy\] unprovisioned: 'open' is not one of block"),
        ("allow_share = 0.9", r":19: \[policy\] allow_share: 0.9 must be above 0 and at most 0.5"),
        ('allow_share = "10%"', r":19: \[policy\] allow_share: expected a number"),
        ('wall_down = "fast"', r":19: \[policy\] wall_down:"),
        ("wall = 1", r":19: \[policy\] wall: unknown field"),
    ],
)
def test_policy_errors_name_line_and_field(policy: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(f"\n[policy]\n{policy}\n")


def test_the_class_of_nobody_never_borrows_the_whole_link() -> None:
    def ceilings(policy: str) -> tuple[int, int]:
        plan = shaping_plan(config(policy), [])  # type: ignore[arg-type]
        down = plan.down.classes[make_handle(DOWN_MAJOR, DEFAULT_MINOR)]
        up = plan.up.classes[make_handle(UP_MAJOR, DEFAULT_MINOR)]
        return down.ceil_bytes_ps * 8, up.ceil_bytes_ps * 8

    shaped = (int(20_000_000 * 0.95), int(5_000_000 * 0.95))
    assert ceilings("") == shaped  # block: only traffic with the gateway itself is carried
    assert ceilings('\n[policy]\nunprovisioned = "wall"\n') == (256_000, 128_000)
    allow = '\n[policy]\nunprovisioned = "allow"\nallow_share = 0.25\n'
    assert ceilings(allow) == (5_000_000, 1_250_000)
    assert unmatched_bounds_bps(config(allow)) == (5_000_000, 1_250_000)  # type: ignore[arg-type]


def test_a_wall_below_one_dhcp_exchange_is_refused() -> None:
    link = Link(20_000_000, 5_000_000, unmatched_down_bps=1_000, unmatched_up_bps=64_000)
    with pytest.raises(
        ValidationError,
        match=r"download rate of traffic of no subscriber \(1.0 kbit/s\) must be at least",
    ):
        build_plan(link, [])


def test_mac_column_binds_prefixes_and_gives_mac_only_subscribers() -> None:
    subs = subscribers(
        "s1,A,10.77.0.10 fd77:0:0:10::/64,1mbit,2mbit,256kbit,1mbit,,02:5E:10:00:00:10",
        "s2,B,,1mbit,2mbit,256kbit,1mbit,,02-5e-10-00-00-12 02:5e:10:00:00:13",
        "s3,C,10.77.0.12,1mbit,2mbit,256kbit,1mbit,,",
    )
    assert [s.macs for s in subs] == [
        ("02:5e:10:00:00:10",),
        ("02:5e:10:00:00:12", "02:5e:10:00:00:13"),
        (),
    ]
    assert subs[1].prefixes == ()
    bound, mobile, plain = (provision_entry(s, i + 1, 0) for i, s in enumerate(subs))
    assert bound.slot_flags == abi.SLOT_MAC_BOUND
    assert mobile.slot_flags == 0 and mobile.macs == subs[1].macs  # followed, not bound
    assert plain.slot_flags == 0
    blocked = Provision(1, ("10.0.0.1",), flags=abi.SLOT_BLOCKED, macs=("02:00:00:00:00:01",))
    assert blocked.slot_flags == abi.SLOT_BLOCKED | abi.SLOT_MAC_BOUND


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["s1,A,,1mbit,2mbit,256kbit,1mbit,,"], r"subs.csv:2: prefixes: subscriber s1: no address"),
        (
            ["s1,A,,1mbit,2mbit,256kbit,1mbit,,02:5e:10"],
            r":2: mac: subscriber s1: '02:5e:10' is not",
        ),
        (["s1,A,,1mbit,2mbit,256kbit,1mbit,,01:00:5e:00:00:01"], r":2: mac: .* multicast"),
        (["s1,A,,1mbit,2mbit,256kbit,1mbit,,00:00:00:00:00:00"], r":2: mac: .* all zeros"),
        (
            ["s1,A,,1mbit,2mbit,256kbit,1mbit,,02:00:00:00:00:01 02:00:00:00:00:01"],
            r":2: mac: subscriber s1: MAC 02:00:00:00:00:01 is listed twice",
        ),
        (
            [
                "s1,A,,1mbit,2mbit,256kbit,1mbit,,"
                + " ".join(f"02:00:00:00:00:0{i}" for i in range(5))
            ],
            r":2: mac: subscriber s1: 5 MACs, at most 4",
        ),
        (
            [
                "s1,A,,1mbit,2mbit,256kbit,1mbit,,02:00:00:00:00:01",
                "s2,B,10.0.0.2,1mbit,2mbit,256kbit,1mbit,,02:00:00:00:00:01",
            ],
            r"subs.csv:3: mac: subscriber s2: MAC 02:00:00:00:00:01 is already s1's \(line 2\)",
        ),
    ],
)
def test_mac_errors_name_line_field_and_subscriber(rows: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        subscribers(*rows)


def test_a_changed_mac_is_a_readdress() -> None:
    before = subscribers("s1,A,10.0.0.1,1mbit,2mbit,256kbit,1mbit,,02:00:00:00:00:01")
    after = subscribers("s1,A,10.0.0.1,1mbit,2mbit,256kbit,1mbit,,02:00:00:00:00:02")
    assert diff(before, after).readdressed == ("s1",)
    assert diff(before, before).empty


def test_a_file_without_the_mac_column_still_parses() -> None:
    text = HEADER.replace(",mac", "") + "s1,A,10.0.0.1,1mbit,2mbit,1mbit,1mbit,\n"
    assert parse_subscribers(text, Path("s.csv"), LINK, 10)[0].macs == ()
    with pytest.raises(
        ConfigError, match=r"s.csv:1: header must be exactly: .* \(and optionally ,mac\)"
    ):
        parse_subscribers(text.replace("quota", "quota,macs"), Path("s.csv"), LINK, 10)
