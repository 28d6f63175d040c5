"""Control benchmark: a month-end batch of plan changes, against one `tc` process per change.

In a throwaway network namespace holding a veth pair (one end the LAN), the real
gateway service runs its real loop with the real shaper (kernel HTB on the
LAN device and its upload IFB), the real usage stream (journal, publish) and
the real control endpoint; only the datapath's steering table and the
counters are fakes (the counters move for a tenth of the subscribers every
read, so every tick rolls up, journals and publishes). A billing client
pipelines N plan changes (each a new download plan for one subscriber) and
the figure is the time from the first request sent to the last reply
received, every change then durable and in the kernel; meanwhile the loop's
meter ticks are timed, and the longest gap between two of them is reported.
The peer, in the same run, alternating: the same N class changes, one
`tc class change` process per change, as LibreQoS-style scripts apply them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from desanet.benchmarks.common import Report, median, parse_args
from desanet.ebpf.datapath import Provision
from desanet.gateway.compose import steady_clock
from desanet.gateway.config import Config
from desanet.gateway.control import MAX_BATCH, ControlEndpoint, request_many
from desanet.gateway.lab import in_netns, netns_cmd
from desanet.gateway.parts import Parts
from desanet.gateway.roles import Roles
from desanet.gateway.service import GatewayService
from desanet.meter.keys import ClientSecurity
from desanet.meter.service import MeterService, StreamConfig
from desanet.shaper.apply import Shaper, upload_ifb_name
from desanet.shaper.plan import classids_for_slot, htb_class
from desanet.shaper.tree import DOWN_MAJOR, ROOT_MINOR, make_handle

LAN = "lan0"
INTERVAL_MS = 1000
# Plan tiers (down min/max, up min/max, bit/s) with guarantees small enough for
# 10,000 of them to fit the 1 Gbit/s link below.
TIERS = [
    (32_000, 2_000_000, 16_000, 1_000_000),
    (64_000, 5_000_000, 32_000, 2_000_000),
    (128_000, 10_000_000, 64_000, 4_000_000),
]
CONFIG = f"""\
[gateway]
id = "bench-control"
lan = "{LAN}"
state_dir = "state"
capacity = {{capacity}}

[link]
down = "1gbit"
up = "500mbit"

[shaping]
leaf = "fq_codel"
rtt = "600ms"

[meter]
interval = "{INTERVAL_MS}ms"

[publish]
usage = "tcp://127.0.0.1:*"
replay = "tcp://127.0.0.1:*"
plaintext = true

[control]
endpoint = "tcp://127.0.0.1:*"

[subscribers]
file = "subscribers.csv"
"""


class SteeringTable:
    """The datapath's steering table in memory (the eBPF maps are measured elsewhere)."""

    def __init__(self) -> None:
        self.slots: dict[int, Provision] = {}

    def attach(self) -> None:
        pass

    def provision_many(self, entries: Sequence[Provision]) -> None:
        self.slots.update((e.slot, e) for e in entries)

    def unprovision(self, slot: int) -> None:
        self.slots.pop(slot, None)

    def prefixes(self) -> dict[int, list[str]]:
        return {slot: list(e.prefixes) for slot, e in self.slots.items()}

    def macs(self) -> dict[int, list[str]]:
        return {slot: list(e.macs) for slot, e in self.slots.items() if e.macs}

    def read_drops(self) -> dict[str, tuple[int, int]]:
        return {}


class MovingCounters:
    """Cumulative counters in which a tenth of the slots move at every read."""

    identity = b"bench-control"

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self._counters = np.zeros((n_slots, 4), dtype=np.uint64)
        self._rng = np.random.default_rng(7)

    def read(self) -> npt.NDArray[np.uint64]:
        moved = self._rng.choice(self.n_slots, size=max(1, self.n_slots // 10), replace=False)
        self._counters[moved] += np.array([1500, 1, 15000, 10], dtype=np.uint64)
        return self._counters.copy()

    def repinned(self) -> bool:
        return False

    def reopen(self) -> MovingCounters:
        return self

    def close(self) -> None:
        pass


def compose(config: Config, roles: Roles, slot_owners: Mapping[int, str]) -> Parts:
    """The production parts, with the steering table and the counters faked."""
    meter = MeterService(
        config.gateway_id,
        config.state_dir,
        StreamConfig(config.publish.usage, config.publish.replay, roles.read),
        slot_owners,
    )
    return Parts(
        datapath=SteeringTable(),
        shaper=Shaper(config.lan, upload_ifb_name(config.lan)),
        meter=meter,
        endpoint=ControlEndpoint(config.control.endpoint, roles.control),
        open_counters=lambda: MovingCounters(config.capacity + 1),
        clock=steady_clock(meter),
    )


class TimedService(GatewayService):
    """The service, noting when each meter tick starts and how large each batch is."""

    ticks: list[float]
    tick_s: list[float]
    batches: list[int]

    def tick(self) -> None:
        start = time.monotonic()
        self.ticks.append(start)
        super().tick()
        self.tick_s.append(time.monotonic() - start)

    def handle_requests(self, requests: Sequence[object]) -> list[dict[str, Any]]:
        self.batches.append(len(requests))
        return super().handle_requests(requests)


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"dnctl{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", LAN, "type", "veth", "peer", "name", f"{LAN}p"],
            ["link", "set", f"{LAN}p", "up"],
            ["link", "set", LAN, "up"],
        ):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def write_files(folder: Path, n: int) -> None:
    (folder / "gateway.toml").write_text(CONFIG.format(capacity=n))
    lines = ["id,name,prefixes,down_min,down_max,up_min,up_max,quota"]
    for i in range(1, n + 1):
        rates = ",".join(f"{r}bit" for r in TIERS[i % len(TIERS)])
        lines.append(f"s{i:05d},Subscriber {i},10.{i >> 16}.{(i >> 8) & 255}.{i & 255},{rates},")
    (folder / "subscribers.csv").write_text("\n".join(lines) + "\n")


class Running:
    """The service looping in its own thread inside the namespace."""

    def __init__(self, ns: str, folder: Path) -> None:
        self.ns = ns
        self.folder = folder
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.service: TimedService | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(600) or self.service is None:
            raise RuntimeError(f"the service did not start: {self.error}")

    def _run(self) -> None:
        try:
            with in_netns(self.ns):
                service = TimedService(self.folder / "gateway.toml", compose=compose)
                service.ticks, service.tick_s, service.batches = [], [], []
                service.start()
                self.service = service
                self.ready.set()
                try:
                    while not self.done.is_set():
                        service.step()
                finally:
                    service.close()
        except BaseException as err:
            self.error = err
            self.ready.set()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(60)
        if self.error is not None:
            raise RuntimeError(f"the service failed: {self.error}") from self.error


def changes(n: int, count: int, round_no: int) -> list[tuple[int, int, int]]:
    """(slot, down_min, down_max) of `count` subscribers spread over the village."""
    step = max(1, n // count)
    bump = round_no + 1  # every round really changes every class
    return [
        (slot, TIERS[slot % 3][0] + 8_000 * bump, TIERS[slot % 3][1] + 100_000 * bump)
        for slot in range(1, n + 1, step)[:count]
    ]


def run_desanet(running: Running, plan: list[tuple[int, int, int]]) -> tuple[float, float, int]:
    """(seconds for the whole batch, longest tick gap in ms while it ran, batches served)."""
    service = running.service
    assert service is not None
    endpoint = service.parts.endpoint.endpoint
    bodies = [
        {
            "op": "plan",
            "sub": f"s{slot:05d}",
            "down_min": down_min,
            "down_max": down_max,
            "up_min": TIERS[slot % 3][2],
            "up_max": TIERS[slot % 3][3],
        }
        for slot, down_min, down_max in plan
    ]
    time.sleep(INTERVAL_MS / 1000 * 1.5)  # at least one tick before the batch
    batches = len(service.batches)
    with in_netns(running.ns):
        start = time.monotonic()
        replies = request_many(endpoint, bodies, ClientSecurity(), timeout_ms=60_000)
        end = time.monotonic()
    refused = [r for r in replies if not (r.get("ok") and r.get("applied"))]
    if refused:
        raise RuntimeError(f"{len(refused)} changes not applied, first: {refused[0]}")
    check_kernel(running.ns, plan)
    time.sleep(INTERVAL_MS / 1000 * 1.5)  # the tick after the batch closes the last gap
    ticks = list(service.ticks)
    gaps = [b - a for a, b in itertools.pairwise(ticks) if b >= start and a <= end]
    return end - start, max(gaps) * 1000, len(service.batches) - batches


def check_kernel(ns: str, plan: list[tuple[int, int, int]]) -> None:
    """Raise unless the kernel's download classes hold every change (read back by netlink)."""
    with in_netns(ns):
        classes = Shaper(LAN).read_back()["down"].classes
    wrong = [
        slot
        for slot, down_min, down_max in plan
        if (c := classes[classids_for_slot(slot)[0]]).rate_bytes_ps != down_min // 8
        or c.ceil_bytes_ps != down_max // 8
    ]
    if wrong:
        raise RuntimeError(f"{len(wrong)} classes do not hold their change, first slot {wrong[0]}")


def run_tc(ns: str, plan: list[tuple[int, int, int]]) -> float:
    """Seconds for the same class changes, one `tc class change` process each."""
    lines = []
    for slot, down_min, down_max in plan:
        classid = classids_for_slot(slot)[0]
        cls = htb_class(
            classid,
            make_handle(DOWN_MAJOR, ROOT_MINOR),
            down_min // 8,
            down_max // 8,
            0,
        )
        # tc takes bursts in bytes and converts them to the same ticks desanet sends.
        burst = cls.buffer_ticks * 64 * cls.rate_bytes_ps // 1_000_000_000
        cburst = cls.cbuffer_ticks * 64 * cls.ceil_bytes_ps // 1_000_000_000
        lines.append(
            f"tc class change dev {LAN} parent 1:1 classid 1:{classid & 0xFFFF:x} htb "
            f"rate {cls.rate_bytes_ps * 8}bit ceil {cls.ceil_bytes_ps * 8}bit burst {burst} "
            f"cburst {cburst} quantum {cls.quantum} prio 0".split()
        )
    start = time.monotonic()
    for cmd in lines:
        subprocess.run(netns_cmd(ns, cmd), check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def bench(report: Report, n: int, count: int, rounds: int) -> None:
    with namespace() as ns, tempfile.TemporaryDirectory(prefix="desanet-bench-") as tmp:
        folder = Path(tmp)
        write_files(folder, n)
        started = time.monotonic()
        running = Running(ns, folder)
        start_s = time.monotonic() - started
        ours, gaps, peer, served = [], [], [], []
        try:
            for round_no in range(rounds):
                elapsed, gap, batches = run_desanet(running, changes(n, count, 2 * round_no))
                ours.append(elapsed)
                gaps.append(gap)
                served.append(batches)
                peer.append(run_tc(ns, changes(n, count, 2 * round_no + 1)))
        finally:
            running.stop()
        assert running.service is not None
        leaf = running.service.applier.leaf_in_use
        tick_ms = median(running.service.tick_s) * 1000
    report.add(
        case=f"{count} plan changes at {n} subscribers",
        desanet_s=median(ours),
        max_tick_gap_ms=max(gaps),
        tick_ms=tick_ms,
        batches=max(served),
        tc_per_change_s=median(peer),
        ratio=median(ours) / median(peer),
    )
    report.headline[f"batch_{count}_s_{n}"] = median(ours)
    report.headline["max_tick_gap_ms"] = max(gaps)
    report.headline[f"batch_{count}_vs_tc_per_change"] = median(ours) / median(peer)
    report.notes.append(
        f"service start (full build of {n} subscribers' trees) took {start_s:.1f} s; "
        f"{leaf} leaves; meter interval {INTERVAL_MS} ms; at most {MAX_BATCH} requests a batch"
    )


def main() -> None:
    args = parse_args(__doc__ or "")
    report = Report(
        "control",
        ["case", "desanet_s", "max_tick_gap_ms", "tick_ms", "batches", "tc_per_change_s", "ratio"],
        quick=args.quick,
    )
    if os.geteuid() != 0:
        report.skip(args, "needs root (a network namespace with kernel HTB)")
        return
    n, count, rounds = (1_000, 200, 2) if args.quick else (10_000, 2_000, 2)
    bench(report, n, count, rounds)
    report.notes.append(
        "desanet_s: first request sent to last reply, every change journaled and in the kernel "
        "(a class change and a leaf change each); tc_per_change_s: the same class changes, one "
        "`tc class change` process each; tick_ms: median length of a meter tick (counters, "
        "roll-up, journal and publish, quotas, status)"
    )
    if args.quick:
        report.notes.append("quick run: smaller village; headline keys name the sizes measured")
    report.finish(args)


if __name__ == "__main__":
    main()
