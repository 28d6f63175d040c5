"""The datapath under real traffic: counts equal nftables in each subscriber namespace, exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from desanet.ebpf.datapath import Datapath
from desanet.gateway.lab import INET_V4, INET_V6, SubscriberHost, Village, in_netns, netns_cmd, run

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
UP_BYTES, UP_PKTS, DOWN_BYTES, DOWN_PKTS = range(4)


def cli(village: Village, *args: str) -> str:
    """Run `desanet` in the gateway namespace as its own process (a real restart boundary)."""
    proc = subprocess.run(
        netns_cmd(village.gw_ns, [sys.executable, "-m", "desanet.gateway.cli", *args]),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def iperf_pairs(village: Village, plan: list[tuple[SubscriberHost, list[str]]]) -> None:
    """One iperf3 server per client in the internet namespace; run all clients at once."""
    servers = []
    for i, _ in enumerate(plan):
        servers.append(
            village.popen(
                village.inet_ns,
                ["iperf3", "-s", "-1", "-p", str(5300 + i)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(0.5)
    clients = []
    for i, (sub, extra) in enumerate(plan):
        target = INET_V6 if "-6" in extra else INET_V4
        cmd = ["iperf3", "-c", target, "-p", str(5300 + i), "-t", "2", *extra]
        clients.append(
            village.popen(sub.netns, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    for proc in clients:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out + err).decode()
    for proc in servers:
        proc.wait(timeout=10)
    time.sleep(0.5)  # last ACKs and FINs of the control connections


def assert_exact(village: Village, datapath: Datapath, slots: dict[int, SubscriberHost]) -> None:
    with in_netns(village.gw_ns):
        counters = datapath.read_counters()
    for slot, sub in slots.items():
        truth = village.truth(sub)
        assert counters[slot].tolist() == [
            truth.up_bytes,
            truth.up_pkts,
            truth.down_bytes,
            truth.down_pkts,
        ], f"subscriber {sub.index} (slot {slot})"
        assert truth.up_bytes > 0 and truth.down_bytes > 0


def test_counts_equal_nftables_and_survive_restart(village4: Village) -> None:
    v = village4
    gw_id = f"traffic{os.getpid()}"
    subs = v.subscribers
    slots = {10 + i: sub for i, sub in enumerate(subs)}
    # First life: attached and provisioned by a separate process, which then exits.
    cli(v, "datapath", "attach", "--lan", v.lan, "--gateway-id", gw_id, "--capacity", "256")
    datapath = Datapath(v.lan, gw_id, capacity=256)
    try:
        for slot, sub in slots.items():
            cli(
                v,
                "datapath",
                "provision",
                "--lan",
                v.lan,
                "--gateway-id",
                gw_id,
                "--capacity",
                "256",
                "--slot",
                str(slot),
                "--prefixes",
                f"{sub.ipv4} {sub.ipv6}",
            )
        iperf_pairs(
            v,
            [
                (subs[0], []),  # TCP IPv4 upload
                (subs[1], ["-6", "-R"]),  # TCP IPv6 download
                (subs[2], ["-u", "-b", "40M", "-R"]),  # UDP IPv4 download
                (subs[3], ["-6", "-u", "-b", "40M"]),  # UDP IPv6 upload
            ],
        )
        with in_netns(v.gw_ns):
            datapath.attach()  # a restarted service: same pins, counters kept
        assert_exact(v, datapath, slots)

        # Second life keeps counting on top of the first.
        iperf_pairs(
            v,
            [
                (subs[0], ["-6", "-R"]),
                (subs[1], ["-u", "-b", "30M"]),
                (subs[2], []),
                (subs[3], ["-R"]),
            ],
        )
        assert_exact(v, datapath, slots)
        listing = cli(
            v, "datapath", "counters", "--lan", v.lan, "--gateway-id", gw_id, "--capacity", "256"
        )
        assert subs[0].ipv4 in listing
    finally:
        with in_netns(v.gw_ns):
            datapath.detach()
    assert "clsact" not in run(["tc", "qdisc", "show", "dev", v.lan], v.gw_ns)
    assert run(["tc", "filter", "show", "dev", v.lan, "ingress"], v.gw_ns).strip() == ""
    assert not datapath.pin_dir.exists()
    assert not datapath.pin_dir.parent.exists()


def test_upload_through_ifb_still_reaches_the_internet(village4: Village) -> None:
    v = village4
    sub = v.subscribers[0]
    run(["ip", "link", "add", "ifb-up", "type", "ifb"], v.gw_ns)
    run(["ip", "link", "set", "ifb-up", "up"], v.gw_ns)
    with in_netns(v.gw_ns):
        datapath = Datapath(v.lan, f"ifb{os.getpid()}", capacity=16, upload_ifb="ifb-up")
        datapath.attach()
    try:
        with in_netns(v.gw_ns):
            datapath.provision(1, [sub.ipv4, sub.ipv6])
        run(["ping", "-c", "3", "-i", "0.2", "-q", INET_V4], sub.netns)
        run(["ping", "-6", "-c", "3", "-i", "0.2", "-q", INET_V6], sub.netns)
        ifb = json.loads(run(["ip", "-s", "-j", "link", "show", "ifb-up"], v.gw_ns))[0]
        assert_exact(v, datapath, {1: sub})
        # Every echo request went through the IFB (and it dropped none of them).
        assert ifb["stats64"]["tx"]["packets"] >= 6
        assert ifb["stats64"]["rx"]["dropped"] == 0
    finally:
        with in_netns(v.gw_ns):
            datapath.detach()
