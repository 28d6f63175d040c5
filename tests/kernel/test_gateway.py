"""The gateway service in a lab village: refusal before the kernel, hot reload, kill -9, control."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from desanet.errors import ControlError
from desanet.gateway.control import request
from desanet.gateway.lab import INET_V4, Village, in_netns, netns_cmd, village
from desanet.gateway.status import StatusSnapshot, read_snapshot
from desanet.meter.client import UsageClient
from desanet.meter.keys import ClientSecurity, generate_keypair, load_keypair

pytestmark = pytest.mark.kernel

CLI = [sys.executable, "-m", "desanet.gateway.cli"]
HEADER = "id,name,prefixes,down_min,down_max,up_min,up_max,quota\n"


class Service:
    """`desanet run` started in a lab's gateway namespace, with its files in a folder."""

    def __init__(self, lab: Village, folder: Path, curve: bool = False) -> None:
        self.lab = lab
        self.folder = folder
        self.config = folder / "gateway.toml"
        self.state = folder / "state"
        self.log = folder / "service.log"
        keys = control_keys = ""
        if curve:
            generate_keypair(folder / "keys", "gateway")
            generate_keypair(folder / "allowed", "billing")
            keys = 'secret_key = "keys/gateway.key_secret"\nallowed_keys = "allowed"\n'
            control_keys = 'allowed_keys = "allowed"\n'  # billing here both reads and controls
        self.config.write_text(
            f'[gateway]\nid = "t-{lab.tag.lower()}"\nlan = "br-lan"\nstate_dir = "state"\n'
            'capacity = 16\n[link]\ndown = "20mbit"\nup = "5mbit"\n[shaping]\nrtt = "20ms"\n'
            '[meter]\ninterval = "200ms"\n[publish]\nusage = "tcp://127.0.0.1:7570"\n'
            f'replay = "tcp://127.0.0.1:7571"\n{keys}{"" if curve else "plaintext = true"}\n'
            f'[control]\nendpoint = "tcp://127.0.0.1:7572"\nsuspend = "block"\n{control_keys}'
            '[metrics]\nlisten = "127.0.0.1:9570"\n'
            '[subscribers]\nfile = "subscribers.csv"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def write_subscribers(self, rows: list[str]) -> None:
        tmp = self.folder / "subscribers.tmp"
        tmp.write_text(HEADER + "\n".join(rows) + "\n")
        tmp.replace(self.folder / "subscribers.csv")

    def start(self) -> StatusSnapshot:
        (self.state / "status.json").unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                netns_cmd(self.lab.gw_ns, [*CLI, "run", "--config", str(self.config)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if (self.state / "status.json").exists():
                return read_snapshot(self.state)
            time.sleep(0.1)
        raise AssertionError(f"service did not start:\n{self.log.read_text()}")

    def status(self, after_ms: int = 0) -> StatusSnapshot:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            snap = read_snapshot(self.state)
            if snap.t_ms > after_ms:
                return snap
            time.sleep(0.05)
        raise AssertionError("status did not advance")

    def kill(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def stop_detach(self) -> subprocess.CompletedProcess[str]:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        cmd = [*CLI, "stop", "--detach", "--config", str(self.config)]
        return subprocess.run(netns_cmd(self.lab.gw_ns, cmd), capture_output=True, text=True)


@pytest.fixture
def lab3() -> Iterator[Village]:
    with village(3) as lab:
        yield lab


def row(lab: Village, i: int, down_max: str = "10mbit", quota: str = "") -> str:
    host = lab.subscribers[i - 1]
    return f"s{i},Sub {i},{host.ipv4} {host.ipv6},1mbit,{down_max},256kbit,2mbit,{quota}"


def netns_exec(ns: str, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(netns_cmd(ns, cmd), capture_output=True, text=True)


def test_bad_subscribers_file_is_refused_before_the_kernel(lab3: Village, tmp_path: Path) -> None:
    svc = Service(lab3, tmp_path)
    svc.write_subscribers([row(lab3, 1), row(lab3, 2).replace("1mbit,10mbit", "12mbit,10mbit")])
    proc = netns_exec(lab3.gw_ns, [*CLI, "run", "--config", str(svc.config)])
    assert proc.returncode == 2
    assert (
        "subscribers.csv:3: down_min: subscriber s2: 12.0 Mbit/s is above down_max" in proc.stderr
    )
    qdiscs = netns_exec(lab3.gw_ns, ["tc", "qdisc", "show", "dev", "br-lan"]).stdout
    assert "clsact" not in qdiscs and "htb" not in qdiscs
    assert not (tmp_path / "state").exists()


def test_hot_reload_loses_no_packets_for_untouched_subscribers(
    lab3: Village, tmp_path: Path
) -> None:
    svc = Service(lab3, tmp_path)
    svc.write_subscribers([row(lab3, 1), row(lab3, 2)])
    svc.start()
    try:
        server = lab3.popen(
            lab3.inet_ns, ["iperf3", "-s", "-1", "-p", "5301"], stdout=subprocess.DEVNULL
        )
        time.sleep(0.3)
        client = lab3.popen(
            lab3.subscribers[0].netns,
            [
                "iperf3",
                "-c",
                INET_V4,
                "-p",
                "5301",
                "-u",
                "-R",
                "-b",
                "2M",
                "-w",
                "1M",
                "-t",
                "6",
                "-J",
            ],
            stdout=subprocess.PIPE,
        )
        time.sleep(2)
        # Add s3, re-plan s2: s1 is untouched and must not lose a packet.
        svc.write_subscribers([row(lab3, 1), row(lab3, 2, down_max="4mbit"), row(lab3, 3)])
        time.sleep(1)
        out, _ = client.communicate(timeout=30)
        server.wait(timeout=10)
        result = json.loads(out)["end"]["sum"]
        assert result["packets"] > 1000
        assert result["lost_packets"] == 0
        snap = svc.status()
        plans = {s.id: s.down_max_bps for s in snap.subscribers}
        assert plans == {"s1": 10_000_000, "s2": 4_000_000, "s3": 10_000_000}
        classes = netns_exec(lab3.gw_ns, ["tc", "class", "show", "dev", "br-lan"]).stdout
        assert classes.count("class htb") == 2 + 3  # root, default, three subscribers
        assert classes.count("ceil 4Mbit") == 1 and classes.count("ceil 10Mbit") == 2
        # A broken file on SIGHUP is refused; the service keeps the previous subscribers.
        svc.write_subscribers([row(lab3, 1), row(lab3, 1)])
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10  # read once unchanged for [subscribers] settle (2 s)
        while "reload refused" not in svc.log.read_text():
            assert time.monotonic() < deadline, svc.log.read_text()
            time.sleep(0.1)
        assert svc.proc.poll() is None
        after = svc.status(after_ms=snap.t_ms)
        assert len(after.subscribers) == 3
        assert any("already defined" in w for w in svc.status(after_ms=after.t_ms).warnings)
    finally:
        svc.kill(signal.SIGTERM)
        svc.stop_detach()


def test_kill9_then_restart_keeps_counters_shaping_and_control(
    lab3: Village, tmp_path: Path
) -> None:
    svc = Service(lab3, tmp_path)
    svc.write_subscribers([row(lab3, 1), row(lab3, 2), row(lab3, 3)])
    svc.start()
    s1, s3 = lab3.subscribers[0], lab3.subscribers[2]
    lab3.reset_truth(s1)  # ground truth from the moment the datapath counts
    try:
        with in_netns(lab3.gw_ns):
            reply = request(
                "tcp://127.0.0.1:7572", {"op": "suspend", "sub": "s3"}, ClientSecurity()
            )
        assert reply["ok"] and reply["state"] == "suspended (block)"
        assert netns_exec(s3.netns, ["ping", "-c1", "-W1", INET_V4]).returncode == 1
        netns_exec(s1.netns, ["ping", "-c", "20", "-i", "0.01", "-s", "1000", INET_V4])
        before = svc.status().subscribers[0]
        svc.kill(signal.SIGKILL)
        # Dead service: shaping and counting go on in the kernel.
        classes = netns_exec(lab3.gw_ns, ["tc", "class", "show", "dev", "br-lan"]).stdout
        assert classes.count("class htb") == 5
        netns_exec(s1.netns, ["ping", "-c", "20", "-i", "0.01", "-s", "1000", INET_V4])
        svc.start()
        netns_exec(s1.netns, ["ping", "-c", "10", "-i", "0.01", "-s", "500", INET_V4])
        time.sleep(0.6)
        after = svc.status().subscribers[0]
        assert after.down_total >= before.down_total and after.up_total >= before.up_total
        assert netns_exec(s3.netns, ["ping", "-c1", "-W1", INET_V4]).returncode == 1
        with (
            in_netns(lab3.gw_ns),
            UsageClient("tcp://127.0.0.1:7570", "tcp://127.0.0.1:7571") as client,
        ):
            billed = client.snapshot().totals["s1"]
        truth = lab3.truth(s1)
        # 50 pings each way crossed the kill; only a stray neighbour-discovery packet
        # (under 100 bytes) may fall between the truth reset and the first poll.
        assert truth.up_bytes >= 40 * 1028 + 10 * 528
        assert abs(billed[0] - truth.up_bytes) < 200 and abs(billed[1] - truth.down_bytes) < 200
        # The restarted service found the trees as it left them: nothing to redo.
        assert "applied: 0 shaper operations" in svc.log.read_text()
    finally:
        svc.kill(signal.SIGTERM)
        result = svc.stop_detach()
    assert "removed the datapath and the shaping" in result.stdout
    qdiscs = netns_exec(lab3.gw_ns, ["tc", "qdisc", "show", "dev", "br-lan"]).stdout
    assert "clsact" not in qdiscs and "htb" not in qdiscs


def test_control_endpoint_rejects_strangers_and_malformed_requests(
    lab3: Village, tmp_path: Path
) -> None:
    svc = Service(lab3, tmp_path, curve=True)
    svc.write_subscribers([row(lab3, 1), row(lab3, 2)])
    svc.start()
    server = load_keypair(tmp_path / "keys" / "gateway.key").public
    billing = ClientSecurity(server, load_keypair(tmp_path / "allowed" / "billing.key_secret"))
    endpoint = "tcp://127.0.0.1:7572"
    try:
        with in_netns(lab3.gw_ns):
            with pytest.raises(ControlError, match="no reply"):
                request(endpoint, {"op": "show", "sub": "s1"}, ClientSecurity(), 500)
            with pytest.raises(ControlError, match="no reply"):
                request(endpoint, {"op": "show", "sub": "s1"}, ClientSecurity(server), 500)
            for bad, error in (
                ({"op": "launch", "sub": "s1"}, "unknown op"),
                ({"op": "plan", "sub": "s1", "down_min": "fast"}, "rate"),
                ({"op": "suspend", "sub": "nobody"}, "unknown subscriber"),
                ([1, 2, 3], "a request is a map"),
            ):
                reply = request(endpoint, bad, billing)  # type: ignore[arg-type]
                assert reply["ok"] is False and error in reply["error"]
            reply = request(endpoint, {"op": "quota", "sub": "s2", "bytes": "1kB"}, billing)
            assert reply["ok"] is True
        netns_exec(
            lab3.subscribers[1].netns, ["ping", "-c", "5", "-i", "0.05", "-s", "400", INET_V4]
        )
        deadline = time.monotonic() + 5
        while svc.status().subscribers[1].state != "fair-use":
            assert time.monotonic() < deadline, "quota throttle not applied"
            time.sleep(0.1)
        time.sleep(0.5)  # the interval after the change carries its events
        with (
            in_netns(lab3.gw_ns),
            UsageClient("tcp://127.0.0.1:7570", "tcp://127.0.0.1:7571", security=billing) as client,
        ):
            events = [(e.sub, e.kind) for m in client.messages(1, follow=False) for e in m.events]
        assert ("s2", "quota") in events and ("s2", "throttled") in events
        assert svc.proc is not None and svc.proc.poll() is None
        with in_netns(lab3.gw_ns), urllib.request.urlopen("http://127.0.0.1:9570/metrics") as r:
            metrics = r.read().decode()
        assert 'desanet_subscriber_state{state="fair-use",subscriber="s2"} 1.0' in metrics
        assert 'desanet_control_requests_total{result="refused"} 4.0' in metrics
        assert 'desanet_link_capacity_bps{direction="down"} 2e+07' in metrics
    finally:
        svc.kill(signal.SIGTERM)
        svc.stop_detach()


def test_addresses_swap_between_subscribers_on_reload(lab3: Village, tmp_path: Path) -> None:
    svc = Service(lab3, tmp_path)
    host1, host2 = lab3.subscribers[0], lab3.subscribers[1]
    svc.write_subscribers([row(lab3, 1), row(lab3, 2), row(lab3, 3)])
    svc.start()
    try:
        # s1 and s2 swap addresses in one reload (each prefix changes hands), s3 leaves.
        swapped = [
            f"s1,Sub 1,{host2.ipv4} {host2.ipv6},1mbit,3mbit,256kbit,1mbit,",
            f"s2,Sub 2,{host1.ipv4} {host1.ipv6},1mbit,10mbit,256kbit,2mbit,",
        ]
        svc.write_subscribers(swapped)
        deadline = time.monotonic() + 10
        while {s.id for s in svc.status().subscribers} != {"s1", "s2"}:
            assert time.monotonic() < deadline, svc.log.read_text()
            time.sleep(0.1)
        before = {s.id: s for s in svc.status().subscribers}
        lab3.reset_truth(host2)
        netns_exec(host2.netns, ["ping", "-c", "5", "-i", "0.05", "-s", "700", INET_V4])
        time.sleep(0.6)
        after = {s.id: s for s in svc.status().subscribers}
        truth = lab3.truth(host2)
        # The ping's 5 x 728 bytes each way are s1's now, none of them s2's; a stray
        # neighbour-discovery packet (under 100 bytes) may fall between the two readings.
        assert truth.up_bytes >= 5 * 728 and truth.down_bytes >= 5 * 728
        assert abs(after["s1"].up_total - before["s1"].up_total - truth.up_bytes) < 200
        assert abs(after["s1"].down_total - before["s1"].down_total - truth.down_bytes) < 200
        assert after["s2"].down_total - before["s2"].down_total < 200
        assert "reload: +0 -1 ~2" in svc.log.read_text()
    finally:
        svc.kill(signal.SIGTERM)
        svc.stop_detach()
