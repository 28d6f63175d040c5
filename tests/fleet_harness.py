"""Real nats-server processes on loopback for the fleet tests: one node or a JetStream cluster.

`nats_hub(directory, nodes=3)` writes one generated configuration file per
node (client port, monitoring port, JetStream store, and for a cluster the
routes to every other node), starts Debian's nats-server on each, waits until
/healthz says JetStream is current, and always stops every process it started
on exit. A node can be killed (SIGKILL), stopped and restarted on the same
ports and store, which is how the tests take the hub away.

The hub's own fragment (accounts, users, permissions, TLS: what `desanet hub
init` writes) is included by every node when given; `fleet_hub()` runs hub
init, starts the nodes with its fragment and creates the stream, as an
operator would. `make_tls()` makes a
throwaway CA and a server certificate for 127.0.0.1 with openssl (installed
with postgresql's ssl-cert).
(Over 400 lines: the nodes, the cluster and the hub around them are started, killed
and restarted together; one module keeps their ports and stores consistent.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest

from desanet.meter import fleet
from desanet.meter.fleet import FleetConnection
from desanet.meter.fleet_hub import HubFiles, HubTLS, init_hub
from tests.pg_harness import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
CLUSTER_NAME = "desanet-test"


@dataclass(frozen=True)
class TLSFiles:
    """A test CA and the hub's certificate and key, signed by it for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> TLSFiles:
    """Generate a throwaway CA and a server certificate in `directory` (openssl, EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=desanet test CA",
    )
    openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return TLSFiles(ca, cert, key)


@dataclass
class NatsNode:
    """One nats-server process: its ports, its directory (config, store, log) and the process."""

    name: str
    directory: Path
    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    scheme: str = "nats"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL of this node."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.directory / "nats-server.conf"

    @property
    def log(self) -> Path:
        return self.directory / "nats-server.log"

    def write_config(self, routes: list[int], include: Path | None) -> None:
        """Generate this node's configuration file (values JSON-quoted, which nats-server reads)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        js = {"store_dir": str(self.directory / "js"), "max_memory_store": 64 << 20}
        lines = [
            f"server_name: {json.dumps(self.name)}",
            f"listen: {json.dumps(f'127.0.0.1:{self.port}')}",
            f"http: {json.dumps(f'127.0.0.1:{self.monitor_port}')}",
            f"jetstream: {json.dumps(js | {'max_file_store': 1 << 30})}",
        ]
        if self.cluster_port is not None:
            cluster = {
                "name": CLUSTER_NAME,
                "listen": f"127.0.0.1:{self.cluster_port}",
                "routes": [f"nats-route://127.0.0.1:{p}" for p in routes],
            }
            lines.append(f"cluster: {json.dumps(cluster)}")
        if include is not None:
            # nats-server resolves an include relative to the including file.
            lines.append(f"include {json.dumps(os.path.relpath(include, self.directory))}")
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the process (see wait_ready); its output goes to nats-server.log."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"nats node {self.name} is already running")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )

    def healthy(self) -> bool:
        """True when /healthz answers ok (JetStream enabled and current with its cluster)."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(json.load(resp).get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the node is healthy; fails the test with the log tail if it never is."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                pytest.fail(f"nats-server {self.name} exited:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        pytest.fail(f"nats-server {self.name} not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def freeze(self) -> None:
        """SIGSTOP the process: connections stay open but nothing is read or answered."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL the process, as a power cut or the OOM killer would."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM the process and wait for it (a clean shutdown)."""
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Start again on the same ports and store, and wait until healthy."""
        self.start()
        self.wait_ready()


@dataclass
class NatsHub:
    """The nodes of one hub (one node, or a cluster whose nodes all route to each other)."""

    nodes: list[NatsNode]
    tls: TLSFiles | None = None

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node."""
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Client URL of the first node."""
        return self.nodes[0].url

    def wait_ready(self) -> None:
        for node in self.nodes:
            node.wait_ready()

    def close(self) -> None:
        """Stop every node (SIGKILL: nothing of a test hub needs to survive)."""
        for node in self.nodes:
            node.kill()


@contextlib.contextmanager
def nats_hub(
    directory: Path, nodes: int = 1, include: Path | None = None, tls: TLSFiles | None = None
) -> Iterator[NatsHub]:
    """Start `nodes` nats-server processes with JetStream (a cluster when nodes > 1).

    `include` is a configuration fragment every node includes (users, permissions,
    TLS); `tls` only tells the hub's client URLs to use tls://, the fragment holds
    the certificate paths. Every process is stopped on exit.
    """
    scheme = "tls" if tls is not None else "nats"
    hub = NatsHub(
        [
            NatsNode(
                f"n{i + 1}",
                directory / f"n{i + 1}",
                cluster_port=free_port() if nodes > 1 else None,
                scheme=scheme,
            )
            for i in range(nodes)
        ],
        tls,
    )
    try:
        for node in hub.nodes:
            routes = [p.cluster_port for p in hub.nodes if p is not node and p.cluster_port]
            node.write_config(routes, include)
            node.start()
        hub.wait_ready()
        yield hub
    finally:
        hub.close()


@dataclass
class FleetHub:
    """A hub configured by `desanet hub init` (TLS, NKEY users), running, with its stream."""

    nats: NatsHub
    files: HubFiles
    tls: TLSFiles

    def gateway(self, gateway_id: str) -> FleetConnection:
        """How gateway `gateway_id` connects, with its own key."""
        return FleetConnection(
            self.nats.urls,
            self.files.gateways[gateway_id],
            gateway_id,
            fleet.gateway_inbox(gateway_id),
            self.tls.ca,
        )

    def collector(self, name: str = "collector") -> FleetConnection:
        """How collector `name` connects."""
        return FleetConnection(
            self.nats.urls,
            self.files.collectors[name],
            name,
            fleet.collector_inbox(name),
            self.tls.ca,
        )

    def billing(self, name: str = "billing") -> FleetConnection:
        """How billing user `name` (the control role) connects."""
        return FleetConnection(
            self.nats.urls,
            self.files.billing[name],
            name,
            fleet.billing_inbox(name),
            self.tls.ca,
        )


async def _create_stream(conn: FleetConnection, config: dict[str, Any]) -> None:
    nc = await nats.connect(**conn.connect_options())
    try:
        for _attempt in range(100):
            try:
                await fleet.ensure_stream(nc.jetstream(), config)
                return
            except nats.errors.Error:
                # A cluster that has just formed elects its meta leader first.
                await asyncio.sleep(0.1)
        pytest.fail("the hub never created the stream")
    finally:
        await nc.close()


@contextlib.contextmanager
def fleet_hub(
    directory: Path, gateways: list[str], nodes: int = 1, replicas: int = 1
) -> Iterator[FleetHub]:
    """`desanet hub init` for `gateways`, the hub's nodes with its fragment, the stream made."""
    tls = make_tls(directory / "tls")
    files = init_hub(
        directory / "conf",
        gateways,
        HubTLS(tls.cert, tls.key),
        replicas=replicas,
        billing=("billing",),
    )
    with nats_hub(directory / "nodes", nodes, include=files.config, tls=tls) as hub:
        configured = FleetHub(hub, files, tls)
        asyncio.run(_create_stream(configured.collector(), fleet.load_stream_config(files.stream)))
        yield configured


@dataclass(frozen=True)
class StoredMessage:
    """One message as the stream holds it."""

    stream_seq: int
    subject: str
    msg_id: str
    data: bytes


async def _read_stream(conn: FleetConnection, timeout_s: float) -> list[StoredMessage]:
    nc = await nats.connect(**conn.connect_options())
    try:
        js = nc.jetstream()
        for _attempt in range(50):
            try:
                total = (await js.stream_info(fleet.STREAM)).state.messages
                sub = await js.pull_subscribe(fleet.USAGE_SUBJECTS, fleet.CONSUMER, fleet.STREAM)
                break
            except nats.errors.TimeoutError:
                # A cluster that just lost a node may still be electing its meta leader.
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the hub never answered for the stream and its consumer")
        # Keyed by stream seq: a message the consumer delivers twice is one stream entry.
        out: dict[int, StoredMessage] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < total and time.monotonic() < deadline:
            try:
                batch = await sub.fetch(256, timeout=0.5)
            except TimeoutError:  # nats-py raises its own or asyncio's: both are TimeoutError
                continue
            for msg in batch:
                headers = msg.headers or {}
                seq = msg.metadata.sequence.stream
                out[seq] = StoredMessage(
                    seq, msg.subject, headers.get(fleet.MSG_ID_HEADER, ""), msg.data
                )
                await msg.ack()
        return [out[k] for k in sorted(out)]
    finally:
        await nc.close()


def read_stream(hub: FleetHub, timeout_s: float = 20.0) -> list[StoredMessage]:
    """Every message the stream holds, in stream order, read through the collectors' consumer."""
    return asyncio.run(_read_stream(hub.collector(), timeout_s))


def start_collector(
    hub: FleetHub, dsn: str, log: Path, batch: int = 20, ack_wait_s: float = 2.0
) -> subprocess.Popen[bytes]:
    """A `desanet hub collect` process with the hub's collector key; output to `log`."""
    args = [sys.executable, "-m", "desanet.gateway.cli", "hub", "collect"]
    for url in hub.nats.urls:
        args += ["--nats", url]
    args += ["--credentials", str(hub.files.collectors["collector"]), "--ca", str(hub.tls.ca)]
    args += ["--dsn", dsn, "--batch", str(batch), "--ack-wait", str(ack_wait_s)]
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def hub_totals(dsn: str, period: str) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """The hub's monthly report (fleet_store.REPORT_SQL) of `period`, for every subscriber
    that moved: (gw, sub) -> (up, down, up_total, down_total)."""
    import psycopg  # the postgres extra, as the tests that call this need anyway

    from desanet.meter.fleet_store import REPORT_SQL, partition_bounds

    low, high = partition_bounds(period)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(REPORT_SQL, {"low": low, "high": high}).fetchall()
    return {(g, s): (int(u), int(d), int(ut), int(dt)) for g, s, u, d, ut, dt in rows if ut or dt}
