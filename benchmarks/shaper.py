"""Shaper benchmark: full apply against `tc -batch`, change latency, read-back and diff.

Everything runs in a throwaway network namespace holding a bridge (the LAN)
and the upload IFB. The peer, `tc -batch`, applies the equivalent tree (same
classes, rates, bursts, quanta and leaves, both directions) in the same run,
alternating with desanet. Most of a full apply is kernel time either way:
every new HTB class makes the kernel walk all existing classes, so both sides
grow quadratically with the tree.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator

from desanet.benchmarks.common import Report, median, parse_args
from desanet.gateway.lab import in_netns
from desanet.shaper.apply import Shaper
from desanet.shaper.diff import diff
from desanet.shaper.plan import Link, ShapingPlan, SubscriberPlan, build_plan
from desanet.shaper.tree import HtbClass, LeafQdisc

LAN = "br-lan"
LINK = Link(down_bps=1_000_000_000, up_bps=500_000_000)
# Plan tiers a village sells (down min/max, up min/max, bit/s).
# Guarantees are small so that 10,000 of them fit the link.
TIERS = [
    (32_000, 2_000_000, 16_000, 1_000_000),
    (64_000, 5_000_000, 32_000, 2_000_000),
    (128_000, 10_000_000, 64_000, 4_000_000),
]


def subscribers(n: int) -> list[SubscriberPlan]:
    return [SubscriberPlan(f"s{i:05d}", i, *TIERS[i % len(TIERS)]) for i in range(1, n + 1)]


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"dnbench{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "add", LAN, "type", "bridge"], ["link", "set", LAN, "up"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _hex(handle: int) -> str:
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}"


def _class_line(dev: str, cls: HtbClass) -> str:
    # tc takes bursts in bytes and converts them to the same ticks desanet sends.
    burst = cls.buffer_ticks * 64 * cls.rate_bytes_ps // 1_000_000_000
    cburst = cls.cbuffer_ticks * 64 * cls.ceil_bytes_ps // 1_000_000_000
    return (
        f"class add dev {dev} parent {_hex(cls.parent)} classid {_hex(cls.classid)} htb "
        f"rate {cls.rate_bytes_ps * 8}bit ceil {cls.ceil_bytes_ps * 8}bit burst {burst} "
        f"cburst {cburst} quantum {cls.quantum} prio {cls.prio}"
    )


def _leaf_line(dev: str, leaf: LeafQdisc) -> str:
    opts = dict(leaf.options)
    if leaf.kind == "pfifo":
        args = f"limit {opts['limit']}"
    elif leaf.kind == "fq_codel":
        args = (
            f"target {opts['target']}us interval {opts['interval']}us limit {opts['limit']} "
            f"flows {opts['flows']} quantum {opts['quantum']} memory_limit {opts['memory_limit']}"
            " ecn"
        )
    else:
        args = f"unlimited rtt {opts['rtt']}us memlimit {opts['memory']}"
    return (
        f"qdisc add dev {dev} parent {_hex(leaf.parent)} handle {leaf.handle >> 16:x}: "
        f"{leaf.kind} {args}"
    )


def tc_batch(plan: ShapingPlan, ifb: str) -> str:
    """The `tc -batch` script that builds the same two trees."""
    lines = []
    for dev, tree in ((LAN, plan.down), (ifb, plan.up)):
        assert tree.root is not None
        lines.append(
            f"qdisc replace dev {dev} root handle {tree.root.handle >> 16:x}: htb "
            f"default {tree.root.default_minor:x} r2q {tree.root.r2q}"
        )
        lines.extend(_class_line(dev, tree.classes[cid]) for cid in sorted(tree.classes))
        lines.extend(_leaf_line(dev, tree.leaves[cid]) for cid in sorted(tree.leaves))
    return "\n".join(lines) + "\n"


def run_tc(ns: str, plan: ShapingPlan, ifb: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".tc") as script:
        script.write(tc_batch(plan, ifb))
        script.flush()
        start = time.perf_counter()
        for cmd in (["link", "add", ifb, "type", "ifb"], ["link", "set", ifb, "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "tc", "-batch", script.name], check=True)
        elapsed = time.perf_counter() - start
    subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", LAN, "root"], check=True
    )
    subprocess.run(["ip", "-n", ns, "link", "del", ifb], check=True)
    return elapsed


def run_desanet(ns: str, plan: ShapingPlan) -> tuple[float, ShapingPlan]:
    with in_netns(ns):
        start = time.perf_counter()
        shaper = Shaper(LAN)
        result = shaper.apply(plan)
        elapsed = time.perf_counter() - start
        shaper.remove()
    return elapsed, result.plan


def bench_apply(report: Report, ns: str, n: int, rounds: int) -> None:
    plan = build_plan(LINK, subscribers(n), leaf="fq_codel", rtt_ms=600.0)
    ours, peer = [], []
    for _ in range(rounds):
        elapsed, applied = run_desanet(ns, plan)
        ours.append(elapsed)
        peer.append(run_tc(ns, applied, Shaper(LAN).upload_ifb))
    ratio = median(ours) / median(peer)
    ops = 2 + sum(len(t.classes) + len(t.leaves) for t in (plan.down, plan.up))
    report.add(
        case=f"full apply, {n} subscribers, both directions",
        requests=ops,
        desanet_ms=median(ours) * 1000,
        tc_batch_ms=median(peer) * 1000,
        ratio=ratio,
    )
    report.headline[f"apply_{n}_vs_tc_batch"] = ratio


def bench_change_and_readback(report: Report, ns: str, n: int, changes: int) -> None:
    plan = build_plan(LINK, subscribers(n), leaf="fq_codel", rtt_ms=600.0)
    with in_netns(ns):
        shaper = Shaper(LAN)
        try:
            current = shaper.apply(plan).plan
            victim = current.subscribers[f"s{n // 2:05d}"]
            latencies = []
            for k in range(changes):
                # Alternate the guarantee so every change really changes the class.
                bump = 8_000 * (1 + k % 2)
                changed = SubscriberPlan(
                    victim.id,
                    victim.slot,
                    victim.down_min_bps + bump,
                    victim.down_max_bps,
                    victim.up_min_bps + bump,
                    victim.up_max_bps,
                )
                start = time.perf_counter()
                current = shaper.apply(current.with_subscriber(changed)).plan
                latencies.append(time.perf_counter() - start)
            readback = []
            for _ in range(3):
                start = time.perf_counter()
                trees = Shaper(LAN, shaper.upload_ifb).read_back()
                pending = sum(len(diff(current.tree(d), trees[d])) for d in ("down", "up"))
                readback.append(time.perf_counter() - start)
            tc_ms = _tc_change_ms(ns, shaper.upload_ifb, current, victim.slot)
            stats_ms = median([_time(shaper.class_stats) for _ in range(3)]) * 1000
        finally:
            shaper.remove()
    report.add(
        case=f"change one subscriber, {n} subscribers",
        requests=2,
        desanet_ms=median(latencies) * 1000,
        tc_batch_ms=tc_ms,
        ratio=median(latencies) * 1000 / tc_ms,
    )
    report.add(case=f"read back + diff, {n} subscribers", desanet_ms=median(readback) * 1000)
    report.add(case=f"class_stats, {n} subscribers", desanet_ms=stats_ms)
    report.headline[f"change_ms_{n}"] = median(latencies) * 1000
    if pending:
        report.notes.append(f"read-back at {n} found {pending} differences (expected 0)")
    report.headline[f"readback_diff_ms_{n}"] = median(readback) * 1000


def _time(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def _tc_change_ms(ns: str, ifb: str, plan: ShapingPlan, slot: int) -> float:
    """The same class change done by one `tc -batch` process (the peer's latency)."""
    script = []
    for dev, tree in ((LAN, plan.down), (ifb, plan.up)):
        cls = next(c for c in tree.classes.values() if c.classid & 0xFFFF == slot + 0xF)
        script.append(_class_line(dev, cls).replace("class add", "class change"))
    times = []
    with tempfile.NamedTemporaryFile("w", suffix=".tc") as f:
        f.write("\n".join(script) + "\n")
        f.flush()
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", ns, "tc", "-batch", f.name], check=True)
            times.append(time.perf_counter() - start)
    return median(times) * 1000


def main() -> None:
    args = parse_args(__doc__ or "")
    report = Report(
        "shaper",
        ["case", "requests", "desanet_ms", "tc_batch_ms", "ratio"],
        quick=args.quick,
    )
    apply_n, change_sizes, rounds, changes = (
        (500, (100, 500), 2, 10) if args.quick else (10_000, (100, 1_000, 10_000), 2, 30)
    )
    with namespace() as ns:
        bench_apply(report, ns, apply_n, rounds)
        for n in change_sizes:
            bench_change_and_readback(report, ns, n, changes)
    report.notes.append("tc_batch_ms of a change is one tc process changing the same two classes")
    if args.quick:
        report.notes.append("quick run: smaller trees; headline keys name the sizes measured")
    report.finish(args)


if __name__ == "__main__":
    main()
