"""Service cost benchmark: the CPU and memory of `desanet run` against its subscriber list.

The real service (`desanet run`, its datapath attached by the spawned loader
child) runs in a lab village's gateway namespace with P provisioned
subscribers (200, 2,000, 10,000), first idle, then with 4 and with 10 % of
them downloading: a small steady UDP flow to each active subscriber's
address (4 packets of 200 bytes a second, enough to move its counters every
interval), sent from the internet side to addresses the gateway forwards to a
neighbour entry on the LAN bridge (no namespace per subscriber is needed for
counters to move). Measured: the service process's CPU time per second
(utime + stime of it and its reaped children, /proc/<pid>/stat) over a
window, and its peak resident memory (VmHWM). The peer is the same service
reading every leaf qdisc's statistics by one full dump each tick
(`[meter] delivered_read = "dump"`, how it read before), measured in the same
run and the same lab, alternating which goes first at each size.
`vs_full_dump_10000` is the peer's idle CPU over the new one's at the largest
size; `active_cpu_us_per_sub` is the extra CPU per downloading subscriber per
tick at the largest size with 10 % downloading.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from desanet.benchmarks.common import Report, parse_args
from desanet.gateway.lab import Village, netns_cmd, subscriber_addresses, village

SIZES = (200, 2_000, 10_000)
# A start compiles the datapath in the loader child (3-6 s here): the smoke run makes two.
QUICK_SIZES = (200,)
MODES = ("moved", "dump")
INTERVAL_S = 1.0
PACKETS_PER_S = 4  # per active subscriber
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLI = [sys.executable, "-m", "desanet.gateway.cli"]
HEADER = "id,name,prefixes,down_min,down_max,up_min,up_max,quota\n"
FAKE_MAC = "02:00:00:00:00:01"  # the LAN bridge floods frames for it; nobody takes them
# The sender: one UDP socket, datagrams to every address in turn, paced.
SENDER = """
import socket, sys, time
addrs = sys.argv[2:]
gap = 1.0 / (float(sys.argv[1]) * len(addrs))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * 172
next_t = time.monotonic()
while True:
    for a in addrs:
        s.sendto(payload, (a, 9))
        next_t += gap
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
"""


@dataclass
class Figures:
    """One service run: CPU in % of a core per phase, peak RSS."""

    idle_pct: float
    four_pct: float
    tenth_pct: float
    rss_mb: float


def active_slots(provisioned: int, active: int) -> list[int]:
    """`active` subscribers spread over the list."""
    step = provisioned // active
    return [1 + k * step for k in range(active)]


def _cpu_s(pid: int) -> float:
    """CPU seconds of every thread of `pid` (schedstat: nanoseconds, where stat has ticks)
    plus its reaped children's (the loader child, done before any window starts)."""
    threads = sum(
        int(path.read_text().split()[0]) for path in Path(f"/proc/{pid}/task").glob("*/schedstat")
    )
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    return threads / 1e9 + children


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


class Service:
    """`desanet run` with P subscribers in the lab's gateway namespace."""

    def __init__(self, lab: Village, folder: Path, provisioned: int, mode: str) -> None:
        self.lab = lab
        self.folder = folder
        folder.mkdir()
        self.config = folder / "gateway.toml"
        self.gateway_id = f"cost-{lab.tag.lower()}-{provisioned}-{mode}"
        self.config.write_text(
            f'[gateway]\nid = "{self.gateway_id}"\nlan = "br-lan"\nstate_dir = "state"\n'
            f'capacity = {provisioned}\n[link]\ndown = "1gbit"\nup = "500mbit"\n'
            f'[shaping]\nleaf = "pfifo"\n[meter]\ninterval = "{INTERVAL_S:g}s"\n'
            f'delivered_read = "{mode}"\n'
            '[publish]\nusage = "tcp://127.0.0.1:7590"\nreplay = "tcp://127.0.0.1:7591"\n'
            'plaintext = true\n[control]\nendpoint = "tcp://127.0.0.1:7592"\n'
            '[subscribers]\nfile = "subscribers.csv"\n'
        )
        rows = [
            f"s{i:05d},Sub {i},{subscriber_addresses(i)[0]},32kbit,2mbit,16kbit,1mbit,"
            for i in range(1, provisioned + 1)
        ]
        (folder / "subscribers.csv").write_text(HEADER + "\n".join(rows) + "\n")
        self.log = folder / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float) -> int:
        status = self.folder / "state" / "status.json"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                netns_cmd(self.lab.gw_ns, [*CLI, "run", "--config", str(self.config)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not status.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        detach = [*CLI, "stop", "--detach", "--config", str(self.config)]
        subprocess.run(netns_cmd(self.lab.gw_ns, detach), capture_output=True)


@contextlib.contextmanager
def sending(lab: Village, slots: Sequence[int]) -> Iterator[None]:
    """A steady UDP flow from the internet side to each of `slots`' addresses."""
    addrs = [subscriber_addresses(s)[0] for s in slots]
    cmd = [sys.executable, "-c", SENDER, str(PACKETS_PER_S), *addrs]
    proc = lab.popen(lab.inet_ns, cmd, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_pct(pid: int, window_s: float) -> float:
    """The process's CPU time over the next `window_s`, in % of one core."""
    before, start = _cpu_s(pid), time.monotonic()
    time.sleep(window_s)
    return 100.0 * (_cpu_s(pid) - before) / (time.monotonic() - start)


def measure(
    lab: Village, folder: Path, provisioned: int, mode: str, window_s: float, settle_s: float
) -> Figures:
    """Start the service, measure it idle, with 4 and with 10 % downloading, stop it."""
    service = Service(lab, folder, provisioned, mode)
    try:
        pid = service.start(timeout_s=60 + provisioned / 50)
        time.sleep(settle_s)  # past the first full read and the first status
        idle = cpu_pct(pid, window_s)
        figures = []
        for active in (4, provisioned // 10):
            with sending(lab, active_slots(provisioned, active)):
                time.sleep(settle_s)
                figures.append(cpu_pct(pid, window_s))
        return Figures(idle, figures[0], figures[1], _hwm_mb(pid))
    finally:
        service.stop()


def neighbours(lab: Village, sizes: Sequence[int]) -> None:
    """Neighbour entries for every address a flow goes to, so the gateway forwards them."""
    slots = {s for p in sizes for a in (4, p // 10) for s in active_slots(p, a)}
    batch = "".join(
        f"neigh replace {subscriber_addresses(s)[0]} lladdr {FAKE_MAC} dev br-lan nud permanent\n"
        for s in sorted(slots)
    )
    subprocess.run(netns_cmd(lab.gw_ns, ["ip", "-batch", "-"]), input=batch.encode(), check=True)


def main() -> None:
    args = parse_args(__doc__ or "")
    report = Report(
        "service_cost",
        ["provisioned", "read", "cpu_idle_pct", "cpu_4_pct", "cpu_10pct_pct", "rss_mb"],
        quick=args.quick,
    )
    if os.geteuid() != 0:
        report.skip(args, "needs root: the service runs in a lab village (network namespaces)")
        return
    try:
        import bcc  # noqa: F401  (the loader child compiles with it)
    except ImportError:
        report.skip(args, "needs BCC (Debian's python3-bpfcc) for the datapath loader")
        return
    sizes = QUICK_SIZES if args.quick else SIZES
    window_s, settle_s = (0.5, 0.5) if args.quick else (10.0, 2.0)
    results: dict[tuple[int, str], Figures] = {}
    with village(1) as lab, tempfile.TemporaryDirectory(prefix="desanet-cost-") as tmp:
        neighbours(lab, sizes)
        for k, provisioned in enumerate(sizes):
            for mode in MODES if k % 2 == 0 else MODES[::-1]:
                folder = Path(tmp) / f"{provisioned}-{mode}"
                results[provisioned, mode] = measure(
                    lab, folder, provisioned, mode, window_s, settle_s
                )
    for provisioned in sizes:
        for mode in MODES:
            f = results[provisioned, mode]
            report.add(
                provisioned=provisioned,
                read="moved leaves" if mode == "moved" else "peer: full dump",
                cpu_idle_pct=f.idle_pct,
                cpu_4_pct=f.four_pct,
                cpu_10pct_pct=f.tenth_pct,
                rss_mb=f.rss_mb,
            )
    small, large = sizes[0], sizes[-1]
    new, peer = results[large, "moved"], results[large, "dump"]
    report.headline[f"idle_cpu_pct_{small}"] = results[small, "moved"].idle_pct
    if large != small:
        report.headline[f"idle_cpu_pct_{large}"] = new.idle_pct
        report.headline[f"idle_cpu_ratio_{large}_vs_{small}"] = (
            new.idle_pct / results[small, "moved"].idle_pct
        )
    # % of a core = 10,000 us per second; one tick per interval.
    per_tick_us = (new.tenth_pct - new.idle_pct) * 10_000 * INTERVAL_S
    report.headline["active_cpu_us_per_sub"] = per_tick_us / (large // 10)
    report.headline["rss_mb"] = max(f.rss_mb for (_, m), f in results.items() if m == "moved")
    report.headline[f"vs_full_dump_{large}"] = peer.idle_pct / new.idle_pct
    report.notes.append(
        f"{window_s:g} s windows, {INTERVAL_S:g} s interval, {PACKETS_PER_S} packets/s of "
        "200 IP bytes to each downloading subscriber; CPU in % of one core; rss_mb is VmHWM"
    )
    report.finish(args)


if __name__ == "__main__":
    main()
