"""Cost of the datapath per packet, and packets per second against nftables set counters.

Part 1 (BPF_PROG_TEST_RUN, in the kernel, no NIC): ns per packet of an empty
tc program and of the datapath with 1, 1,000 and 65,536 subscribers
provisioned, IPv4 and IPv6, 64- and 1500-byte frames; overhead = datapath -
empty, in ns and %. Empty and datapath runs alternate, the median is kept.

The datapath runs with passive RTT tracking compiled in (the default); its
peer is the same program compiled without it (DESANET_RTT_TRACK 0), loaded on
the same maps and measured in the same rounds, on the UDP frames above and on
TCP frames carrying the timestamp option (the packets the tracker reads: one
flow-table lookup each).

Part 2 (real packets through a veth path): a UDP flood of small packets from a
subscriber namespace through a router namespace to a sink, counted per
subscriber either by the desanet datapath or by the usual alternative, an
nftables set of subscriber addresses with per-element counters; the two (and
a run with neither) alternate, and the sink's received packets per second are
compared. Run as root: `python -m desanet.benchmarks.datapath [--quick] [--json F]`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterator

from pyroute2 import IPRoute

from desanet.benchmarks.common import Report, median, parse_args
from desanet.ebpf import frames
from desanet.ebpf.bpf_syscall import prog_test_run
from desanet.ebpf.datapath import Datapath, Provision, compile_program
from desanet.gateway.lab import in_netns, netns_cmd, run

SUBSCRIBER_COUNTS = (1, 1000, 65536)
INTERNET_V4, INTERNET_V6 = "198.51.100.1", "2001:db8:ff::1"


def subscriber_v4(i: int) -> str:
    return str(ipaddress.IPv4Address("10.64.0.0") + i)


def subscriber_v6(i: int) -> str:
    return str(ipaddress.IPv6Address("2001:db8:64::") + (i << 16))


@contextlib.contextmanager
def namespace(name: str) -> Iterator[str]:
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "link", "set", "lo", "up"], name)
        yield name
    finally:
        run(["ip", "netns", "delete", name], check=False)


def provision(dp: Datapath, start: int, stop: int) -> None:
    classid = 0x10000 + 16
    dp.provision_many(
        [
            Provision(i + 1, (subscriber_v4(i), subscriber_v6(i)), classid + i, classid + i)
            for i in range(start, stop)
        ]
    )


def _test_run_ns(fds: tuple[int, ...], frame: bytes, repeat: int, rounds: int) -> list[float]:
    """Per program, the median over `rounds` of the kernel's mean ns per run on `frame`;
    the programs take turns within each round, so drift affects both alike."""
    samples: list[list[float]] = [[] for _ in fds]
    for _ in range(rounds):
        for fd, out in zip(fds, samples, strict=True):
            out.append(float(prog_test_run(fd, frame, repeat).duration_ns))
    return [median(x) for x in samples]


def ns_per_packet(report: Report, quick: bool) -> dict[tuple[int, str, int, str], float]:
    """Overhead in ns over the empty program, keyed (subscribers, family, frame, program):
    program "rtt" (tracking on, what runs) or "no-rtt" (the peer without it)."""
    repeat = 20_000 if quick else 1_000_000
    rounds = 3 if quick else 5
    counts = (1, 1000) if quick else SUBSCRIBER_COUNTS
    overheads: dict[tuple[int, str, int, str], float] = {}
    with namespace(f"dnb{os.getpid()}") as ns:
        run(["ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1"], ns)
        with in_netns(ns):
            dp = Datapath("lan0", f"bench{os.getpid()}", capacity=65536)
            dp.attach()
            try:
                empty_fd = dp.program_fd("desanet_empty")
                ingress_fd = dp.program_fd("desanet_ingress")
                # The peer shares the pinned maps, so it sees the same subscribers.
                peer = compile_program(dp.capacity, dp.pin_dir, rtt_track=False)
                peer_fd = int(peer.load_func(b"desanet_ingress", peer.SCHED_CLS).fd)
                provisioned = 0
                for count in counts:
                    provision(dp, provisioned, count)
                    provisioned = count
                    last = count - 1  # the most recently added subscriber, deepest in the trie
                    cases = [
                        (family, size, frames.udp_frame(src, dst, max(size, 14 + 48 + 8))[0])
                        for family, src, dst in (
                            ("IPv4", subscriber_v4(last), INTERNET_V4),
                            ("IPv6", subscriber_v6(last), INTERNET_V6),
                        )
                        for size in (64, 1500)
                    ]
                    # An upload ACK of a flow the tracker knows (the first run adds it).
                    tcp = frames.tcp_frame(subscriber_v4(last), INTERNET_V4, tsval=7, tsecr=3)
                    cases.append(("IPv4 TCP+TS", len(tcp), tcp))
                    for family, size, frame in cases:
                        fds = (empty_fd, ingress_fd, peer_fd)
                        e, f, g = _test_run_ns(fds, frame, repeat, rounds)
                        overheads[(count, family, size, "rtt")] = f - e
                        overheads[(count, family, size, "no-rtt")] = g - e
                        for program, ns_run in (("rtt", f), ("no-rtt", g)):
                            report.add(
                                case=f"test_run {program}",
                                subscribers=count,
                                family=family,
                                frame=size,
                                empty_ns=e,
                                datapath_ns=ns_run,
                                overhead_ns=ns_run - e,
                                overhead_pct=100.0 * (ns_run - e) / e if e else 0.0,
                            )
            finally:
                dp.detach()
    return overheads


NFT_PEER = """
table inet desanet_peer {{
    set subscribers_up {{ type ipv4_addr; counter; size 131072; }}
    set subscribers_down {{ type ipv4_addr; counter; size 131072; }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        ip saddr @subscribers_up
        ip daddr @subscribers_down
    }}
}}
"""


def nft_load(ns: str, count: int) -> None:
    elements = ", ".join(subscriber_v4(i) for i in range(count - 1)) + ", 10.99.0.2"
    ruleset = NFT_PEER.format() + (
        f"add element inet desanet_peer subscribers_up {{ {elements} }}\n"
        f"add element inet desanet_peer subscribers_down {{ {elements} }}\n"
    )
    subprocess.run(netns_cmd(ns, ["nft", "-f", "-"]), input=ruleset, text=True, check=True)


def rx_packets(ns: str, dev: str) -> int:
    stats = json.loads(run(["ip", "-s", "-j", "link", "show", dev], ns))
    return int(stats[0]["stats64"]["rx"]["packets"])


def flood(sender: str, sink: str, seconds: float) -> float:
    """Packets per second the sink received from a UDP flood of small packets."""
    server = subprocess.Popen(
        netns_cmd(sink, ["iperf3", "-s", "-1", "-p", "5999"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        before = rx_packets(sink, "in0")
        start = time.monotonic()
        subprocess.run(
            netns_cmd(
                sender,
                [
                    "iperf3",
                    "-c",
                    "10.98.0.2",
                    "-u",
                    "-b",
                    "0",
                    "-l",
                    "64",
                    "-t",
                    str(seconds),
                    "-p",
                    "5999",
                ],
            ),
            capture_output=True,
            check=True,
        )
        elapsed = time.monotonic() - start
        return (rx_packets(sink, "in0") - before) / elapsed
    finally:
        server.wait(timeout=10)


def pps_comparison(report: Report, quick: bool) -> float:
    seconds = 1.0 if quick else 4.0
    rounds = 1 if quick else 3
    count = 1000 if quick else 65536
    tag = f"dnp{os.getpid()}"
    with namespace(f"{tag}s") as sub, namespace(f"{tag}r") as router, namespace(f"{tag}k") as sink:
        run(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                sub,
                "type",
                "veth",
                "peer",
                "name",
                "lan0",
                "netns",
                router,
            ]
        )
        run(
            [
                "ip",
                "link",
                "add",
                "wan0",
                "netns",
                router,
                "type",
                "veth",
                "peer",
                "name",
                "in0",
                "netns",
                sink,
            ]
        )
        for ns, dev, addr in (
            (sub, "eth0", "10.99.0.2/24"),
            (router, "lan0", "10.99.0.1/24"),
            (router, "wan0", "10.98.0.1/24"),
            (sink, "in0", "10.98.0.2/24"),
        ):
            run(["ip", "addr", "add", addr, "dev", dev], ns)
            run(["ip", "link", "set", dev, "up"], ns)
        run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], router)
        run(["ip", "route", "add", "default", "via", "10.99.0.1"], sub)
        run(["ip", "route", "add", "default", "via", "10.98.0.1"], sink)
        with in_netns(router):
            dp = Datapath("lan0", f"{tag}pps", capacity=65536)
            dp.attach()
            provision(dp, 0, count - 1)
            dp.provision(count, ["10.99.0.2"])
        results: dict[str, list[float]] = {"none": [], "desanet": [], "nftables": []}
        try:

            def desanet_on() -> None:
                with in_netns(router):
                    dp.attach()

            def desanet_off() -> None:
                with in_netns(router), IPRoute() as ipr:
                    ipr.tc("del", "clsact", ipr.link_lookup(ifname="lan0")[0])

            def nft_off() -> None:
                run(["nft", "delete", "table", "inet", "desanet_peer"], router)

            switches = {
                "desanet": (desanet_on, desanet_off),
                "nftables": (lambda: nft_load(router, count), nft_off),
                "none": (lambda: None, lambda: None),
            }
            desanet_off()
            order = list(switches)
            for round_no in range(rounds):
                # Rotate the order each round so no configuration always runs first.
                for name in order[round_no % 3 :] + order[: round_no % 3]:
                    on, off = switches[name]
                    on()
                    time.sleep(0.5)
                    results[name].append(flood(sub, sink, seconds))
                    off()
        finally:
            with in_netns(router):
                dp.detach()
    pps = {name: median(values) for name, values in results.items()}
    for name, value in pps.items():
        report.add(
            case=f"veth pps: {name}",
            subscribers=count,
            family="IPv4",
            frame=64 + 28 + 14,
            pps=value,
        )
    return pps["desanet"] / pps["nftables"]


def main() -> None:
    args = parse_args(__doc__ or "")
    report = Report(
        name="datapath",
        columns=[
            "case",
            "subscribers",
            "family",
            "frame",
            "empty_ns",
            "datapath_ns",
            "overhead_ns",
            "overhead_pct",
            "pps",
        ],
        quick=args.quick,
    )
    overheads = ns_per_packet(report, args.quick)
    ratio = pps_comparison(report, args.quick)
    largest = max(c for c, _, _, _ in overheads)
    tcp_size = next(size for _, family, size, _ in overheads if family == "IPv4 TCP+TS")
    report.headline = {
        "overhead_ns_1": overheads[(1, "IPv4", 1500, "rtt")],
        f"overhead_ns_{largest}": overheads[(largest, "IPv4", 1500, "rtt")],
        "nft_pps_ratio": ratio,
    }
    for count in (1, largest):
        report.headline[f"overhead_ns_no_rtt_{count}"] = overheads[(count, "IPv4", 1500, "no-rtt")]
        for program in ("rtt", "no-rtt"):
            key = f"overhead_ns_tcp_ts_{program.replace('-', '_')}_{count}"
            report.headline[key] = overheads[(count, "IPv4 TCP+TS", tcp_size, program)]
    if args.quick:
        report.notes.append("quick run: 1 and 1,000 subscribers only, short floods")
    report.notes.append(
        "test_run: ingress program, median of alternating runs; pps: sink rx, median"
    )
    report.notes.append(
        "test_run rtt: passive RTT tracking on (what runs); no-rtt: the same program compiled "
        "without it, same maps, same rounds"
    )
    report.finish(args)


if __name__ == "__main__":
    main()
