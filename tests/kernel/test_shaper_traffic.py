"""Fair sharing under real TCP: eight greedy subscribers, iperf3, the datapath steering packets.

One village of eight subscribers serves every case: the datapath sets each
packet's class from its subscriber's address, the shaper's download tree sits
on the LAN bridge and its upload tree on the IFB. Download and upload run at
the same time when the leaves queue flows apart (see `greedy`). Rates are
delivered IP bytes per second: download from the nftables counters in each
subscriber's namespace, upload from counters by source address in the
internet namespace, over a window after TCP ramped up.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from desanet.ebpf.datapath import Datapath
from desanet.gateway.lab import INET_V4, SubscriberHost, Village, in_netns, run, village
from desanet.shaper.apply import Shaper
from desanet.shaper.plan import Link, ShapingPlan, SubscriberPlan, build_plan, classids_for_slot

pytestmark = pytest.mark.kernel

# Both directions at 20 Mbit/s, so a 2 Mbit/s cap binds below the fair share both ways.
LINK = Link(down_bps=20_000_000, up_bps=20_000_000)
RUN_S = 7
WINDOW = (2.5, 6.5)
M = 1_000_000


@dataclass
class Lab:
    village: Village
    shaper: Shaper
    datapath: Datapath


def _counter_ruleset(subs: list[SubscriberHost]) -> str:
    counters = "\n".join(f"counter u{s.index} {{ }}" for s in subs)
    rules = "\n".join(f'ip saddr {s.ipv4} counter name "u{s.index}"' for s in subs)
    return (
        "table inet shapertest {\n"
        f"{counters}\n"
        "chain input { type filter hook input priority 0; policy accept;\n"
        f"{rules}\n}}\n}}\n"
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with village(8) as v:
        subprocess.run(
            ["ip", "netns", "exec", v.inet_ns, "nft", "-f", "-"],
            input=_counter_ruleset(v.subscribers),
            text=True,
            check=True,
        )
        with in_netns(v.gw_ns):
            shaper = Shaper(v.lan)
            shaper.ensure_ifb()
            datapath = Datapath(
                v.lan, f"shaper{os.getpid()}", capacity=64, upload_ifb=shaper.upload_ifb
            )
            datapath.attach()
        try:
            with in_netns(v.gw_ns):
                for sub in v.subscribers:
                    down, up = classids_for_slot(sub.index)
                    datapath.provision(sub.index, [sub.ipv4, sub.ipv6], down, up)
            yield Lab(v, shaper, datapath)
        finally:
            with in_netns(v.gw_ns):
                datapath.detach()
                shaper.remove()


def plan_for(lab: Lab, **special: tuple[int, int, int, int]) -> ShapingPlan:
    """Every subscriber 1/20 Mbit/s both ways, except those named (s1=(dmin, dmax, umin, umax))."""
    subs = []
    for sub in lab.village.subscribers:
        rates = special.get(f"s{sub.index}", (M, 20 * M, M, 20 * M))
        subs.append(SubscriberPlan(f"s{sub.index}", sub.index, *rates))
    return build_plan(LINK, subs, leaf="fq_codel")


def _upload_bytes(v: Village) -> dict[int, int]:
    data = json.loads(
        run(["nft", "-j", "list", "counters", "table", "inet", "shapertest"], v.inet_ns)
    )
    return {
        int(item["counter"]["name"][1:]): item["counter"]["bytes"]
        for item in data["nftables"]
        if "counter" in item
    }


def _snapshot(v: Village) -> tuple[float, dict[int, int], dict[int, int]]:
    start = time.monotonic()
    down = {s.index: v.truth(s).down_bytes for s in v.subscribers}
    up = _upload_bytes(v)
    return (start + time.monotonic()) / 2, down, up


def load(
    lab: Lab,
    udp: dict[int, list[str]] | None = None,
    during: object = None,
    directions: tuple[str, ...] = ("down", "up"),
) -> tuple[dict[int, float], dict[int, float], dict[int, dict]]:
    """Greedy TCP in `directions` for every subscriber not in `udp` (iperf3 extra args instead).

    Returns download and upload rates (bit/s of IP) and the iperf3 JSON of the UDP clients.
    """
    v, udp = lab.village, udp or {}
    servers, clients = [], {}
    for sub in v.subscribers:
        for port in (5200 + 2 * sub.index, 5201 + 2 * sub.index):
            servers.append(
                v.popen(v.inet_ns, ["iperf3", "-s", "-1", "-p", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )  # fmt: skip
    time.sleep(0.5)
    for sub in v.subscribers:
        base = ["iperf3", "-c", INET_V4, "-t", str(RUN_S), "-J"]
        if sub.index in udp:
            cmds = [[*base, "-p", str(5200 + 2 * sub.index), *udp[sub.index]]]
        else:
            cmds = []
            if "down" in directions:
                cmds.append([*base, "-p", str(5200 + 2 * sub.index), "-R"])
            if "up" in directions:
                cmds.append([*base, "-p", str(5201 + 2 * sub.index)])
        for n, cmd in enumerate(cmds):
            clients[(sub.index, n)] = v.popen(sub.netns, cmd, stdout=subprocess.PIPE)
    started = time.monotonic()
    time.sleep(WINDOW[0])
    t0, down0, up0 = _snapshot(v)
    if callable(during):
        during()
    time.sleep(max(0.0, started + WINDOW[1] - time.monotonic()))
    t1, down1, up1 = _snapshot(v)
    reports = {}
    for (index, _), proc in clients.items():
        out, _ = proc.communicate(timeout=RUN_S + 20)
        assert proc.returncode == 0, out.decode()[-500:]
        if index in udp:
            reports[index] = json.loads(out)
    for proc in servers:
        if proc.poll() is None:  # the server of a direction not measured never got a client
            proc.kill()
        proc.wait(timeout=10)
    elapsed = t1 - t0
    down = {i: (down1[i] - down0[i]) * 8 / elapsed for i in down0}
    up = {i: (up1[i] - up0[i]) * 8 / elapsed for i in up0}
    return down, up, reports


def greedy(lab: Lab) -> tuple[dict[int, float], dict[int, float]]:
    """Download and upload rates of eight greedy subscribers.

    Both directions run at once when the leaves queue flows apart (fq_codel,
    cake). With pfifo leaves (kernels without them) a subscriber's ACKs wait
    behind its own bulk data in one FIFO, which is what flow queueing is for,
    so each direction is then measured on its own.
    """
    if lab.shaper.leaf_in_use in ("fq_codel", "cake"):
        return load(lab)[:2]
    return load(lab, directions=("down",))[0], load(lab, directions=("up",))[1]


def jain(rates: list[float]) -> float:
    return sum(rates) ** 2 / (len(rates) * sum(r * r for r in rates))


def apply(lab: Lab, plan: ShapingPlan) -> ShapingPlan:
    with in_netns(lab.village.gw_ns):
        return lab.shaper.apply(plan).plan


def test_eight_greedy_subscribers_share_fairly_and_fill_the_link(lab: Lab) -> None:
    apply(lab, plan_for(lab))
    down, up = greedy(lab)
    for rates, link in ((down, LINK.down_bps), (up, LINK.up_bps)):
        assert jain(list(rates.values())) >= 0.98, rates
        assert sum(rates.values()) >= 0.90 * link, rates


def test_a_capped_subscriber_gets_its_cap_and_the_others_the_rest(lab: Lab) -> None:
    apply(lab, plan_for(lab, s1=(M, 2 * M, M, 2 * M)))
    down, up = greedy(lab)
    for rates, link in ((down, LINK.down_bps), (up, LINK.up_bps)):
        assert abs(rates[1] - 2 * M) <= 0.05 * 2 * M, rates
        assert sum(rates.values()) >= 0.90 * link, rates
        others = [r for i, r in rates.items() if i != 1]
        assert jain(others) >= 0.98, rates


def test_a_guaranteed_rate_holds_against_seven_greedy_neighbours(lab: Lab) -> None:
    apply(lab, plan_for(lab, s1=(5 * M, 20 * M, 5 * M, 20 * M)))
    down, up = greedy(lab)
    assert down[1] >= 0.95 * 5 * M, down
    assert up[1] >= 0.95 * 5 * M, up


def test_plan_changes_during_traffic_lose_nothing_for_the_others(lab: Lab) -> None:
    plan = apply(lab, plan_for(lab))
    udp = {
        2: ["-u", "-b", "800k", "-l", "1000", "-R"],
        3: ["-u", "-b", "800k", "-l", "1000", "-R"],
        4: ["-u", "-b", "800k", "-l", "1000"],
    }
    with in_netns(lab.village.gw_ns):
        before = lab.shaper.class_stats()
    changes = []

    def change_plans() -> None:
        nonlocal plan
        for k in range(6):
            s1 = SubscriberPlan("s1", 1, M + 8_000 * k, (4 + 2 * k) * M, M, (2 + k) * M)
            step = plan.with_subscriber(s1)
            if k % 2 and "s9" in step.subscribers:
                step = step.without_subscriber("s9")  # a class appears and disappears
            elif k % 2:
                step = step.with_subscriber(SubscriberPlan("s9", 9, M // 2, M, M // 2, M))
            else:
                step = step.with_subscriber(SubscriberPlan("s5", 5, M, (10 + k) * M, M, 5 * M))
            plan = apply(lab, step)
            changes.append(plan)
            time.sleep(0.4)

    down, _, reports = load(lab, udp, during=change_plans)
    assert len(changes) == 6
    for index, report in reports.items():
        summary = report["end"]["sum"]
        assert summary["packets"] > 500 and summary["lost_packets"] == 0, (index, summary)
    with in_netns(lab.village.gw_ns):
        after = lab.shaper.class_stats()
    for direction in ("down", "up"):
        for slot in (2, 3, 4):
            assert after[direction][slot].drops == before[direction][slot].drops
    # The changed subscriber kept moving data throughout (its own upload competes for
    # its ACKs on pfifo leaves, so only a floor is checked).
    assert down[1] > M / 2
