"""A village in network namespaces, for the demo and the kernel tests.

Topology (every name carries a per-lab tag so labs never collide):

    inet ns ── veth "wan" ── gateway ns ── bridge "br-lan" ─┬─ veth ── subscriber ns s1
      198.51.100.1/24          198.51.100.2/24              ├─ veth ── subscriber ns s2
      2001:db8:ff::1/64        10.77.0.1/16, fd77::1/64     └─ ...

Subscriber i has 10.77.<i // 200>.<10 + i % 200> and fd77::<i + 16>, a default
route through the gateway, and an nftables table counting the IP bytes it
sends and receives: the ground truth desanet's counts are compared with.
Everything is removed by `close()`, which the context manager always calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from desanet.errors import DesanetError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_lab_counter = itertools.count()

INET_V4 = "198.51.100.1"
GW_WAN_V4 = "198.51.100.2"
INET_V6 = "2001:db8:ff::1"
GW_WAN_V6 = "2001:db8:ff::2"
GW_LAN_V4 = "10.77.0.1"
GW_LAN_V6 = "fd77::1"
LAN_V4_NET = "10.77.0.0/16"
LAN_V6_NET = "fd77::/64"

# Only packets carrying the subscriber's own address count, as in the datapath:
# link-local neighbour discovery and multicast to solicited-node groups do not.
_TRUTH_RULESET = """
table inet desanet_truth {{
    counter sent {{ }}
    counter received {{ }}
    chain output {{
        type filter hook output priority 0; policy accept;
        ip saddr {v4} counter name "sent"
        ip6 saddr {v6} counter name "sent"
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip daddr {v4} counter name "received"
        ip6 daddr {v6} counter name "received"
    }}
}}
"""


class LabError(DesanetError):
    """The namespace lab could not be built (missing tool, not root, kernel refusal)."""


def netns_cmd(netns: str, cmd: Sequence[str]) -> list[str]:
    """`cmd` run inside network namespace `netns`.

    nsenter enters the network namespace only; `ip netns exec` would also
    remount /sys, hiding the bpffs where the datapath pins its maps.
    """
    return ["nsenter", f"--net=/var/run/netns/{netns}", *cmd]


def run(cmd: Sequence[str], netns: str | None = None, check: bool = True) -> str:
    """Run a command (inside `netns` when given) and return its standard output."""
    full = netns_cmd(netns, cmd) if netns else list(cmd)
    proc = subprocess.run(full, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(full)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the enclosed code (this thread only) inside network namespace `name`.

    Sockets opened inside (netlink, ZeroMQ) stay in that namespace after exit.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"cannot enter netns {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise LabError(f"cannot return from netns {name}: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)


@dataclass(frozen=True)
class Truth:
    """IP bytes and packets a subscriber's own namespace saw (nftables counters)."""

    up_bytes: int
    up_pkts: int
    down_bytes: int
    down_pkts: int


@dataclass
class SubscriberHost:
    """One subscriber's namespace and addresses."""

    index: int
    netns: str
    ipv4: str
    ipv6: str
    gw_port: str


@dataclass
class Village:
    """A built lab: the namespaces, addresses and the processes started in them."""

    tag: str
    inet_ns: str
    gw_ns: str
    lan: str
    wan: str
    subscribers: list[SubscriberHost]
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def namespaces(self) -> list[str]:
        return [self.inet_ns, self.gw_ns, *(s.netns for s in self.subscribers)]

    def popen(self, netns: str, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside `netns`; it is killed by `close()` if still running."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            netns_cmd(netns, cmd),
            start_new_session=True,
            **kwargs,  # type: ignore[call-overload]
        )
        self._procs.append(proc)
        return proc

    def truth(self, sub: SubscriberHost) -> Truth:
        """Read the nftables ground-truth counters in the subscriber's namespace."""
        data = json.loads(
            run(["nft", "-j", "list", "counters", "table", "inet", "desanet_truth"], sub.netns)
        )
        counters = {
            item["counter"]["name"]: item["counter"]
            for item in data["nftables"]
            if "counter" in item
        }
        return Truth(
            up_bytes=counters["sent"]["bytes"],
            up_pkts=counters["sent"]["packets"],
            down_bytes=counters["received"]["bytes"],
            down_pkts=counters["received"]["packets"],
        )

    def reset_truth(self, sub: SubscriberHost) -> None:
        """Zero a subscriber's ground-truth counters."""
        run(["nft", "reset", "counters", "table", "inet", "desanet_truth"], sub.netns)

    def close(self) -> None:
        """Stop every process started in the lab and delete its namespaces."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
        for ns in self.namespaces:
            # Processes started by others (the service under test) die with their namespace's pids.
            pids = run(["ip", "netns", "pids", ns], check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "delete", ns], check=False)


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise LabError("the namespace lab needs root (network namespaces, veth, nftables)")
    for tool in ("ip", "nft", "ethtool"):
        if shutil.which(tool) is None:
            raise LabError(f"the namespace lab needs {tool!r}: run `make setup`")


def subscriber_addresses(index: int) -> tuple[str, str]:
    """IPv4 and IPv6 address of lab subscriber `index` (1-based)."""
    v4 = ipaddress.IPv4Address(GW_LAN_V4) + (index // 200) * 256 + 9 + index % 200
    v6 = ipaddress.IPv6Address(GW_LAN_V6) + 15 + index
    return str(v4), str(v6)


def _no_offloads(dev: str, netns: str) -> None:
    # nftables counts a GSO/GRO super-packet once, as one big IP packet; the
    # datapath counts it as the packets it leaves as. Turning offloads off on
    # the lab's veths makes the ground truth count wire packets too. TCP still
    # builds super-packets for software GSO unless the device caps them at one
    # segment, hence gso_max_segs.
    run(["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off"], netns)
    run(["ip", "link", "set", "dev", dev, "gso_max_segs", "1"], netns)


def build_village(n_subscribers: int, offloads: bool = False, tag: str | None = None) -> Village:
    """Create the namespaces, links, addresses and ground-truth counters of a lab village."""
    _require_tools()
    if not 1 <= n_subscribers <= 2000:
        raise LabError(f"a lab village has 1 to 2000 subscribers, not {n_subscribers}")
    tag = tag or f"dn{os.getpid() % 100000}x{next(_lab_counter)}"
    village = Village(
        tag=tag,
        inet_ns=f"{tag}-inet",
        gw_ns=f"{tag}-gw",
        lan="br-lan",
        wan="wan",
        subscribers=[],
    )
    try:
        _build(village, n_subscribers, offloads)
    except BaseException:
        village.close()
        raise
    return village


def _add_namespace(ns: str) -> None:
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "set", "lo", "up"], ns)
    # Addresses are unique in the lab: waiting for duplicate detection only slows tests.
    dad_off = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
    # Every run starts from the same TCP state: by default Linux remembers each
    # destination's last ssthresh, so a flow would start from whatever the previous
    # run left behind (at 600 ms RTT that skews shares for tens of seconds).
    fresh_tcp = ["net.ipv4.tcp_no_metrics_save=1"]
    run(["sysctl", "-qw", *dad_off, *fresh_tcp], ns)


def _build(v: Village, n_subscribers: int, offloads: bool) -> None:
    for ns in (v.inet_ns, v.gw_ns):
        _add_namespace(ns)
    gw, inet = v.gw_ns, v.inet_ns
    run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"], gw)

    run(
        [
            "ip",
            "link",
            "add",
            "wan",
            "netns",
            gw,
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            inet,
        ]
    )
    run(["ip", "addr", "add", f"{GW_WAN_V4}/24", "dev", "wan"], gw)
    run(["ip", "addr", "add", f"{GW_WAN_V6}/64", "dev", "wan", "nodad"], gw)
    run(["ip", "link", "set", "wan", "up"], gw)
    run(["ip", "addr", "add", f"{INET_V4}/24", "dev", "uplink"], inet)
    run(["ip", "addr", "add", f"{INET_V6}/64", "dev", "uplink", "nodad"], inet)
    run(["ip", "link", "set", "uplink", "up"], inet)
    run(["ip", "route", "add", LAN_V4_NET, "via", GW_WAN_V4], inet)
    run(["ip", "route", "add", LAN_V6_NET, "via", GW_WAN_V6], inet)
    if not offloads:
        _no_offloads("wan", gw)
        _no_offloads("uplink", inet)

    run(["ip", "link", "add", "br-lan", "type", "bridge"], gw)
    run(["ip", "addr", "add", f"{GW_LAN_V4}/16", "dev", "br-lan"], gw)
    run(["ip", "addr", "add", f"{GW_LAN_V6}/64", "dev", "br-lan", "nodad"], gw)
    run(["ip", "link", "set", "br-lan", "up"], gw)

    for i in range(1, n_subscribers + 1):
        ns = f"{v.tag}-s{i}"
        port = f"lan{i}"
        ipv4, ipv6 = subscriber_addresses(i)
        # Listed before it exists, so a failure below still removes it.
        v.subscribers.append(SubscriberHost(index=i, netns=ns, ipv4=ipv4, ipv6=ipv6, gw_port=port))
        _add_namespace(ns)
        run(
            [
                "ip",
                "link",
                "add",
                port,
                "netns",
                gw,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ]
        )
        run(["ip", "link", "set", port, "master", "br-lan", "up"], gw)
        run(["ip", "addr", "add", f"{ipv4}/16", "dev", "eth0"], ns)
        run(["ip", "addr", "add", f"{ipv6}/64", "dev", "eth0", "nodad"], ns)
        run(["ip", "link", "set", "eth0", "up"], ns)
        run(["ip", "route", "add", "default", "via", GW_LAN_V4], ns)
        run(["ip", "-6", "route", "add", "default", "via", GW_LAN_V6], ns)
        if not offloads:
            _no_offloads("eth0", ns)
            _no_offloads(port, gw)
        subprocess.run(
            netns_cmd(ns, ["nft", "-f", "-"]),
            input=_TRUTH_RULESET.format(v4=ipv4, v6=ipv6),
            text=True,
            check=True,
        )
    if not offloads:
        _no_offloads("br-lan", gw)
    _wait_for_reachability(v)


def _wait_for_reachability(v: Village) -> None:
    # Neighbour discovery takes a moment; make sure every path answers before tests count bytes.
    deadline = time.monotonic() + 10
    for sub in v.subscribers:
        for addr in (INET_V4, INET_V6):
            while not _ping_ok(sub.netns, addr):
                if time.monotonic() > deadline:
                    raise LabError(f"lab subscriber {sub.index} cannot reach {addr}")
                time.sleep(0.1)
        v.reset_truth(sub)


def _ping_ok(netns: str, addr: str) -> bool:
    return (
        subprocess.run(
            netns_cmd(netns, ["ping", "-c1", "-W1", "-q", addr]), capture_output=True
        ).returncode
        == 0
    )


@contextlib.contextmanager
def village(n_subscribers: int, offloads: bool = False) -> Iterator[Village]:
    """Build a lab village for the duration of a `with` block; always cleaned up."""
    lab = build_village(n_subscribers, offloads=offloads)
    try:
        yield lab
    finally:
        lab.close()
