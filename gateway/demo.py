# Over 400 lines: one timeline, read top to bottom; the report is gateway/report.py and the
# console during the run gateway/demo_console.py.
"""`desanet demo`: a village of 8 subscribers in network namespaces, the real service, real traffic.

Timeline: build the village, start `desanet run` in the gateway namespace,
measure idle latency, then every subscriber runs iperf3 TCP downloads (4 flows)
and an upload (odd subscribers over IPv4, even over IPv6) while subscriber s1
pings the internet side. Midway the demo suspends s6 through the control
endpoint; s5 passes its small quota and the gateway throttles it by itself. At
the end, billed bytes (the usage stream's snapshot) are compared with nftables
counters of delivered bytes (down in each subscriber's namespace, up on the
internet side), and a Markdown report with a PNG plot is written.
Namespaces, processes and pinned maps are removed on exit and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from desanet.errors import DesanetError
from desanet.gateway import report
from desanet.gateway.control import request
from desanet.gateway.demo_console import USER as DEMO_USER
from desanet.gateway.demo_console import DemoConsole
from desanet.gateway.lab import INET_V4, INET_V6, Village, in_netns, netns_cmd, run, village
from desanet.gateway.report import DemoRecord, DemoSubscriber, LatencySample, Sample
from desanet.gateway.status import read_snapshot
from desanet.meter.client import UsageClient
from desanet.meter.keys import ClientSecurity

Printer = Callable[[str], object]
LINK_DOWN, LINK_UP = "20mbit", "5mbit"
STANDARD = ("1mbit", "20mbit", "256kbit", "5mbit")
# (name, role, down_min, down_max, up_min, up_max)
PLANS = [
    ("Ibu Sari", "standard", *STANDARD),
    ("Pak Budi", "standard", *STANDARD),
    ("Warung Dewi", "standard", *STANDARD),
    ("Sekolah", "standard", *STANDARD),
    ("Pak Joko", "quota", *STANDARD),
    ("Bu Rina", "suspended", *STANDARD),
    ("Puskesmas", "capped", "1mbit", "1500kbit", "256kbit", "384kbit"),
    ("Koperasi", "premium", "2mbit", "20mbit", "512kbit", "5mbit"),
]
# Upload offered per subscriber when the leaves are FIFOs (no fq_codel/cake): a
# greedy upload would fill the subscriber's own FIFO and hold its download's
# ACKs behind it for hundreds of ms. With flow-queueing leaves uploads are greedy.
FIFO_UPLOAD = {
    "standard": "450k",
    "quota": "450k",
    "suspended": "450k",
    "capped": "250k",
    "premium": "900k",
}
IPERF_DOWN_PORT, IPERF_UP_PORT = 5200, 5300
_PING_LINE = re.compile(r"^\[(\d+\.\d+)\].*time=([0-9.]+) ms")


def _install_delivered_counters(lab: Village) -> None:
    """nftables counters on the internet side: IP bytes that arrived from each subscriber.

    The lab's own counters sit in the subscriber's namespace, where "sent" also
    holds packets the gateway's upload queue dropped; billing counts delivered.
    """
    counters = "\n".join(f"    counter from_s{h.index} {{ }}" for h in lab.subscribers)
    rules = "\n".join(
        f'        ip saddr {h.ipv4} counter name "from_s{h.index}"\n'
        f'        ip6 saddr {h.ipv6} counter name "from_s{h.index}"'
        for h in lab.subscribers
    )
    ruleset = (
        f"table inet desanet_delivered {{\n{counters}\n    chain input {{\n"
        f"        type filter hook input priority 0; policy accept;\n{rules}\n    }}\n}}\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", lab.inet_ns, "nft", "-f", "-"], input=ruleset, text=True, check=True
    )


def _arrived_from_subscribers(lab: Village) -> dict[str, int]:
    doc = json.loads(
        run(["nft", "-j", "list", "counters", "table", "inet", "desanet_delivered"], lab.inet_ns)
    )
    return {
        item["counter"]["name"].removeprefix("from_"): int(item["counter"]["bytes"])
        for item in doc["nftables"]
        if "counter" in item
    }


def _endpoints(workdir: Path) -> dict[str, str]:
    """The service's endpoints: ipc sockets, reachable from the host namespace (the console)."""
    return {name: f"ipc://{workdir / name}.ipc" for name in ("usage", "replay", "control")}


def _config_text(gateway_id: str, state_dir: Path, endpoints: dict[str, str]) -> str:
    return f"""\
[gateway]
id = "{gateway_id}"
lan = "br-lan"
state_dir = "{state_dir}"
capacity = 64

[link]
down = "{LINK_DOWN}"
up = "{LINK_UP}"

[shaping]
leaf = "fq_codel"
rtt = "50ms"

[meter]
interval = "500ms"

[latency]
window = "10s"

[publish]
usage = "{endpoints["usage"]}"
replay = "{endpoints["replay"]}"
plaintext = true

[control]
endpoint = "{endpoints["control"]}"
suspend = "wall"

[subscribers]
file = "subscribers.csv"
"""


def _subscribers_csv(lab: Village, quota_bytes: int) -> str:
    lines = ["id,name,prefixes,down_min,down_max,up_min,up_max,quota"]
    for host, (name, role, *rates) in zip(lab.subscribers, PLANS, strict=True):
        quota = str(quota_bytes) if role == "quota" else ""
        lines.append(f"s{host.index},{name},{host.ipv4} {host.ipv6},{','.join(rates)},{quota}")
    return "\n".join(lines) + "\n"


class _Pinger:
    """Reads `ping -D` output in a thread: (seconds since `t0`, RTT ms) per reply."""

    def __init__(self, proc: subprocess.Popen[bytes], t0: float) -> None:
        self.samples: list[tuple[float, float]] = []
        self._t0 = t0
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None  # started with stdout=PIPE
        for raw in proc.stdout:
            match = _PING_LINE.match(raw.decode(errors="replace"))
            if match:
                self.samples.append((float(match.group(1)) - self._t0, float(match.group(2))))


def _wait_for_status(state_dir: Path, service: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise DesanetError(f"the service exited ({service.returncode}):\n{log.read_text()}")
        with contextlib.suppress(DesanetError):
            return read_snapshot(state_dir)
        time.sleep(0.2)
    raise DesanetError(f"the service did not start within 60 s:\n{log.read_text()}")


def _idle_ping(lab: Village, count: int = 10) -> list[float]:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.subscribers[0].netns,
            "ping",
            "-D",
            "-n",
            "-i",
            "0.1",
            "-c",
            str(count),
            INET_V4,
        ],
        capture_output=True,
        text=True,
    ).stdout
    return [float(m.group(2)) for line in out.splitlines() if (m := _PING_LINE.match(line))]


def _start_load(lab: Village, seconds: int, paced: bool) -> list[subprocess.Popen[bytes]]:
    procs = []
    for host in lab.subscribers:
        for port in (IPERF_DOWN_PORT + host.index, IPERF_UP_PORT + host.index):
            procs.append(
                lab.popen(
                    lab.inet_ns,
                    ["iperf3", "-s", "-1", "-p", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    time.sleep(0.5)  # servers listening before clients connect
    for host, plan in zip(lab.subscribers, PLANS, strict=True):
        target = INET_V4 if host.index % 2 else INET_V6
        upload = ["-b", FIFO_UPLOAD[plan[1]]] if paced else []
        for port, extra in ((IPERF_DOWN_PORT, ["-R", "-P", "4"]), (IPERF_UP_PORT, upload)):
            cmd = ["iperf3", "-c", target, "-p", str(port + host.index), "-t", str(seconds)]
            procs.append(
                lab.popen(
                    host.netns,
                    [*cmd, "-i", "0", *extra],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    return procs


def _link_rtt(latency: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """The link's (p50, p95) ms by direction from the status snapshot's `latency` part."""
    return {
        direction: (entry["p50_ms"], entry["p95_ms"])
        for direction, entry in latency.get("link", {}).items()
        if entry.get("p50_ms") is not None and entry.get("p95_ms") is not None
    }


def _progress(record: DemoRecord, print_: Printer) -> None:
    # Mean rates over the last ~5 s, the span between two progress lines.
    if len(record.samples) < 2:
        return
    b = record.samples[-1]
    a = next((x for x in record.samples if x.t_s >= b.t_s - 5.0), record.samples[-2])
    dt = (b.t_s - a.t_s) or 1.0
    cells = [
        f"{s.id} {8 * (b.down[s.id] - a.down[s.id]) / dt / 1e6:4.1f}/"
        f"{8 * (b.up[s.id] - a.up[s.id]) / dt / 1e6:3.1f}"
        for s in record.subscribers
    ]
    down = sum(8 * (b.down[i] - a.down[i]) for i in b.down) / dt / 1e6
    up = sum(8 * (b.up[i] - a.up[i]) for i in b.up) / dt / 1e6
    print_(f"  t={b.t_s:5.1f}s  link {down:4.1f}/{up:3.1f} Mbit/s | " + "  ".join(cells))


def run_demo(
    seconds: int = 50, out_dir: Path = Path("demo-report"), print_: Printer = print
) -> dict[str, Any]:
    """Run the whole demo; returns the report's summary with `ok` (all checks met)."""
    for tool in ("iperf3", "ping"):
        if shutil.which(tool) is None:
            raise DesanetError(f"the demo needs {tool!r}: run `sudo make setup`")
    if seconds < 20:
        raise DesanetError("the demo needs at least 20 seconds of load")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="desanet-demo-"))
    print_("building the village: internet, gateway, 8 subscribers in network namespaces")
    try:
        with village(len(PLANS)) as lab:
            tag = lab.tag
            _install_delivered_counters(lab)
            record = _run(lab, workdir, seconds, print_)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    record.elapsed_s = time.monotonic() - started
    summary = report.write(record, out_dir)
    checks = {
        "fairness >= 0.95": summary["jain"] >= 0.95,
        "billing within 0.1%": summary["billing_error"] <= 0.001,
        "quota throttle seen": summary["throttled_at_s"] is not None,
        "throttle announced in the usage stream": any(
            sub == "s5" and kind == "throttled" for _, sub, kind, _ in record.stream_events
        ),
        "passive WAN RTT shown": summary["passive_rtt_ms"].get("wan", {}).get("points", 0) > 0,
    }
    summary["ok"] = all(checks.values())
    summary["lab_tag"] = tag
    print_(report.render_markdown(record, summary, str(out_dir / "throughput.png")))
    for name, passed in checks.items():
        print_(f"{'PASS' if passed else 'FAIL'}: {name}")
    print_(
        f"report written to {out_dir}/report.md with {out_dir}/throughput.png and "
        f"{out_dir}/{report.LATENCY_PLOT}"
    )
    return summary


def _run(lab: Village, workdir: Path, seconds: int, print_: Printer) -> DemoRecord:
    gateway_id = f"demo-{lab.tag}"
    state_dir = workdir / "state"
    config = workdir / "gateway.toml"
    quota_bytes = seconds * 160_000  # passed about halfway through at a standard share
    endpoints = _endpoints(workdir)
    config.write_text(_config_text(gateway_id, state_dir, endpoints))
    (workdir / "subscribers.csv").write_text(_subscribers_csv(lab, quota_bytes))
    log = workdir / "service.log"
    cli = [sys.executable, "-m", "desanet.gateway.cli"]
    print_(f"starting `desanet run` in namespace {lab.gw_ns} (compiling the datapath)")
    with open(log, "wb") as log_file:
        service = subprocess.Popen(
            netns_cmd(lab.gw_ns, [*cli, "run", "--config", str(config)]),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    console: DemoConsole | None = None
    try:
        console = DemoConsole(config, workdir)
        return _drive(
            lab, state_dir, service, log, seconds, quota_bytes, endpoints, console, print_
        )
    finally:
        if console is not None:
            console.close()
        # SIGTERM, then remove the datapath (and its pins in the host's bpffs) and the shaping.
        subprocess.run(
            netns_cmd(lab.gw_ns, [*cli, "stop", "--detach", "--config", str(config)]),
            capture_output=True,
            timeout=60,
        )
        if service.poll() is None:
            service.kill()
        service.wait()


def _drive(
    lab: Village,
    state_dir: Path,
    service: subprocess.Popen[bytes],
    log: Path,
    seconds: int,
    quota_bytes: int,
    endpoints: dict[str, str],
    console: DemoConsole,
    print_: Printer,
) -> DemoRecord:
    snap = _wait_for_status(state_dir, service, log)
    for host in lab.subscribers:
        lab.reset_truth(host)
    run(["nft", "reset", "counters", "table", "inet", "desanet_delivered"], lab.inet_ns)
    subs = [
        DemoSubscriber(f"s{h.index}", name, role, f"{dmin}-{dmax} down, {umin}-{umax} up")
        for h, (name, role, dmin, dmax, umin, umax) in zip(lab.subscribers, PLANS, strict=True)
    ]
    record = DemoRecord(
        subscribers=subs,
        leaf_wanted=snap.leaf_wanted,
        leaf_in_use=snap.leaf_in_use,
        warnings=list(snap.warnings),
        link_down_bps=snap.link_down_bps,
        link_up_bps=snap.link_up_bps,
    )
    record.console_url = console.url
    record.console_answered = console.answers()
    if record.console_answered:
        print_(
            f"console: {console.url} (user {DEMO_USER}, password {console.password}; "
            "self-signed certificate), open while the demo runs"
        )
    else:
        print_(f"console did not answer at {console.url}; see {console.log}")
    if snap.leaf_in_use != snap.leaf_wanted:
        print_(f"note: this kernel lacks {snap.leaf_wanted}; the shaper uses {snap.leaf_in_use}")
    record.idle_ping_ms = _idle_ping(lab)
    print_(f"idle latency s1 -> internet: {report.percentile(record.idle_ping_ms, 50):.2f} ms")
    print_(
        f"load: iperf3 TCP down and up on all 8 subscribers for {seconds} s; "
        f"s6 is suspended at {0.35 * seconds:.0f} s, s5 has a {quota_bytes / 1e6:.0f} MB quota"
    )
    t0 = time.time()
    paced = snap.leaf_in_use not in ("fq_codel", "cake")
    if paced:
        print_(
            "uploads are paced below each fair share: with FIFO leaves a full upload queue "
            "would delay the subscriber's own download ACKs (fq_codel isolates them)"
        )
    record.uploads_paced = paced
    load = _start_load(lab, seconds, paced)
    ping = lab.popen(
        lab.subscribers[0].netns,
        ["ping", "-D", "-n", "-i", "0.2", INET_V4],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    load.append(ping)
    pinger = _Pinger(ping, t0)
    record.suspend_at_s = 0.35 * seconds
    suspended = False
    last_t, last_progress = 0, 0.0
    while time.time() - t0 < seconds:
        time.sleep(0.25)
        snap = read_snapshot(state_dir)
        if snap.t_ms == last_t:
            continue
        last_t = snap.t_ms
        t_s = snap.t_ms / 1000 - t0
        states = {s.id: s.state for s in snap.subscribers}
        record.samples.append(
            Sample(
                t_s,
                {s.id: s.down_total for s in snap.subscribers},
                {s.id: s.up_total for s in snap.subscribers},
                states,
            )
        )
        record.latency.append(LatencySample(t_s, _link_rtt(snap.latency)))
        if record.throttled_at_s is None and states.get("s5") == "fair-use":
            record.throttled_at_s = t_s
            record.events.append((t_s, "s5", "throttled", "quota passed: fair-use plan"))
            print_(f"  t={t_s:5.1f}s  s5 passed its quota: the gateway throttled it to fair use")
        if not suspended and t_s >= record.suspend_at_s:
            with in_netns(lab.gw_ns):
                reply = request(
                    endpoints["control"],
                    {"op": "suspend", "sub": "s6"},
                    ClientSecurity(),
                )
            suspended = True
            record.suspend_at_s = t_s
            record.events.append((t_s, "s6", "suspended", f"control reply: {reply.get('state')}"))
            print_(f"  t={t_s:5.1f}s  billing suspended s6 through the control endpoint")
        if t_s - last_progress >= 5:
            last_progress = t_s
            _progress(record, print_)
    record.loaded_ping_ms = [(t, rtt) for t, rtt in pinger.samples if t >= 0]
    print_("load done: stopping traffic, comparing billed bytes with ground truth")
    for proc in load:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _finish(lab, state_dir, endpoints, record)


def _finish(
    lab: Village, state_dir: Path, endpoints: dict[str, str], record: DemoRecord
) -> DemoRecord:
    time.sleep(1.5)  # three intervals: the last bytes are polled and published
    with (
        in_netns(lab.gw_ns),
        UsageClient(endpoints["usage"], endpoints["replay"]) as client,
    ):
        billed = client.snapshot()
        for msg in client.messages(1, follow=False):
            record.stream_events += [(msg.seq, e.sub, e.kind, e.detail) for e in msg.events]
    arrived = _arrived_from_subscribers(lab)
    for host, sub in zip(lab.subscribers, record.subscribers, strict=True):
        truth = lab.truth(host)
        # Delivered: up as the internet side received it, down as the subscriber received it.
        record.truth[sub.id] = (arrived[sub.id], truth.down_bytes)
        record.sent_up[sub.id] = truth.up_bytes
        record.billed[sub.id] = billed.totals.get(sub.id, (0, 0))
    record.warnings = list(read_snapshot(state_dir).warnings)
    return record
