"""The operator's verbs: run, stop, status, control, demo, bench."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from desanet.errors import DesanetError
from desanet.gateway.config import load_config

DEFAULT_CONFIG = "/etc/desanet/gateway.toml"


def register(subparsers: Any) -> None:
    """Add the gateway verbs to the `desanet` parser."""
    run = subparsers.add_parser("run", help="run the gateway service (foreground)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help="gateway TOML file")
    run.add_argument("--check", action="store_true", help="only check the config and exit")
    run.set_defaults(func=cmd_run)

    stop = subparsers.add_parser("stop", help="stop the running service")
    stop.add_argument("--config", default=DEFAULT_CONFIG)
    stop.add_argument(
        "--detach", action="store_true", help="also remove the datapath and shaping from the kernel"
    )
    stop.set_defaults(func=cmd_stop)

    status = subparsers.add_parser("status", help="per-subscriber table and link use")
    status.add_argument("--config", default=DEFAULT_CONFIG)
    status.add_argument("--watch", action="store_true", help="refresh every interval")
    status.add_argument("--json", action="store_true", help="print the raw snapshot")
    status.set_defaults(func=cmd_status)

    control = subparsers.add_parser("control", help="send a control request (billing's side)")
    control.add_argument("--connect", required=True, help="control endpoint, tcp://host:port")
    control.add_argument("--server-key", type=Path, help="the gateway's public key file")
    control.add_argument("--client-key", type=Path, help="this client's secret key file")
    control.add_argument("op", help="plan, plan_reset, suspend, resume, quota, quota_reset, show")
    control.add_argument("sub", help="subscriber id")
    control.add_argument("args", nargs="*", help="key=value, e.g. down_max=4mbit mode=block")
    control.set_defaults(func=cmd_control)

    demo = subparsers.add_parser("demo", help="the village demo in network namespaces")
    demo.add_argument("--seconds", type=int, default=50, help="seconds of load (default 50)")
    demo.add_argument("--out", type=Path, default=Path("demo-report"), help="report folder")
    demo.set_defaults(func=cmd_demo)

    bench = subparsers.add_parser("bench", help="run every benchmark with its peer")
    bench.add_argument("--quick", action="store_true", help="seconds-long smoke runs")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="JSON folder")
    bench.add_argument("names", nargs="*", metavar="NAME", help="only these (default: all)")
    bench.set_defaults(func=cmd_bench)


def cmd_run(args: argparse.Namespace) -> int:
    """Check everything, then run until SIGTERM."""
    from desanet.gateway.service import GatewayService

    gateway = GatewayService(args.config)
    if args.check:
        print(f"{args.config}: ok, {len(gateway.subscribers)} subscribers")
        return 0
    gateway.start()
    try:
        gateway.run()
    finally:
        gateway.close()
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the service and wait; with --detach remove what desanet put in the kernel."""
    from desanet.gateway.pidlock import running_pid

    config = load_config(args.config)
    pid = running_pid(config.state_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while running_pid(config.state_dir) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        if running_pid(config.state_dir) == pid:
            raise DesanetError(f"the service (pid {pid}) did not stop within 30 s")
        print(f"stopped the service (pid {pid})")
    if args.detach:
        from desanet.ebpf.datapath import Datapath
        from desanet.shaper.apply import Shaper, upload_ifb_name

        ifb = upload_ifb_name(config.lan)
        Datapath(config.lan, config.gateway_id, capacity=config.capacity, upload_ifb=ifb).detach()
        Shaper(config.lan, ifb).remove()
        print(f"removed the datapath and the shaping from {config.lan}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the table of the latest snapshot (again every interval with --watch)."""
    import json
    from dataclasses import asdict

    from desanet.gateway.status import read_snapshot, render

    config = load_config(args.config)
    while True:
        snap = read_snapshot(config.state_dir)
        now = time.time_ns() // 1_000_000
        text = json.dumps(asdict(snap), indent=1) if args.json else render(snap, now)
        if args.watch:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            sys.stdout.flush()
            time.sleep(config.interval_ms / 1000)
        else:
            print(text)
            return 0


def _value(text: str) -> object:
    if text in ("nil", "none", "null"):
        return None
    return int(text) if text.isdigit() else text


def cmd_control(args: argparse.Namespace) -> int:
    """Send one request and print the reply; exit 1 when refused."""
    import json

    from desanet.gateway.control import request
    from desanet.meter.keys import ClientSecurity, load_keypair

    body: dict[str, object] = {"op": args.op, "sub": args.sub}
    for item in args.args:
        key, sep, value = item.partition("=")
        if not sep:
            raise DesanetError(f"argument {item!r}: use key=value")
        body[key] = _value(value)
    security = ClientSecurity()
    if args.server_key is not None:
        client = load_keypair(args.client_key) if args.client_key is not None else None
        security = ClientSecurity(load_keypair(args.server_key).public, client)
    reply = request(args.connect, body, security)
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the village demo and write its report."""
    from desanet.gateway.demo import run_demo
    from desanet.gateway.report import pyplot

    pyplot()  # without matplotlib, fail now rather than after the whole run
    summary = run_demo(seconds=args.seconds, out_dir=args.out)
    return 0 if summary["ok"] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Run every benchmarks/<name>.py module (or those named), each writing <out>/<name>.json.

    Each runs as its own program (`python -m`): the gateway starts benchmarks, it never
    imports them (they sit above it). One this machine cannot run says why and skips.
    """
    import desanet

    folder = Path(desanet.__file__).parent / "benchmarks"
    names = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "common"))
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        raise DesanetError(
            f"no benchmark named {', '.join(unknown)}; there are: {', '.join(names)}"
        )
    if args.names:
        names = [n for n in names if n in args.names]
    failed = []
    for name in names:
        print(f"== benchmarks.{name}", flush=True)
        cmd = [
            sys.executable,
            "-m",
            f"desanet.benchmarks.{name}",
            "--json",
            str(args.out / f"{name}.json"),
        ]
        if args.quick:
            cmd.append("--quick")
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        raise DesanetError(f"benchmarks failed: {', '.join(failed)}")
    return 0
