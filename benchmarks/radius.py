"""RADIUS benchmark: Interim-Updates per second into FreeRADIUS + PostgreSQL, and a day's catch-up.

The server is Debian's FreeRADIUS 3 with the sql module writing radacct to
a throwaway PostgreSQL through the shipped queries (desanet.gateway.radius_lab,
the tests' server). The client is the gateway's own: the real MeterService
journals usage intervals, then the real RadiusAccounting (pyrad packets,
window of 32, one request in flight per session) forwards the journal
and each figure is the time from its start until every request is
acknowledged. Before a figure counts, radacct's octets per user are checked
against what was journaled.

- interims_per_s: N subscribers, every journaled interval one interim
  period after the last, so every interval is an Interim-Update for each;
  the interims counted (unique requests minus the Starts and the
  Accounting-On, which the time includes) over the time;
- catchup_1d_s: RADIUS was away for a day: the journal holds a day of 1 s
  intervals of 200 subscribers, every one moving every second, at the
  default interim of 5 min, and the forwarder drains it (reading and
  decoding every interval, 57,600 Interim-Updates).

The peer, in the same run: FreeRADIUS's own radclient sending the same
number of Interim-Updates from a file, 32 in parallel (`-p 32`), to the same
server. `interims_per_s_for(...)` is also the fleet benchmark's RADIUS peer.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from desanet.benchmarks.common import Report, parse_args
from desanet.cython_ext.usage import UsageInterval
from desanet.errors import DesanetError
from desanet.gateway import radius_lab
from desanet.gateway.pg_lab import postgres_cluster
from desanet.gateway.radius_lab import FreeRadius
from desanet.meter.keys import ServerSecurity
from desanet.meter.radius import AccountingConfig, RadiusAccounting
from desanet.meter.radius_transport import RadiusServer
from desanet.meter.service import MeterService, StreamConfig

GATEWAY = "desa-bench"
T0_MS = 1_793_491_200_000  # 2026-11-01 00:00 UTC: no month ends inside a run
QUICK = {"subscribers": 50, "rounds": 8, "catchup_subscribers": 20, "catchup_s": 1800}
FULL = {"subscribers": 200, "rounds": 50, "catchup_subscribers": 200, "catchup_s": 86_400}
DEFAULT_INTERIM_S = 300
WINDOW = 32  # AccountingConfig's default: what the gateway runs with


@dataclass(frozen=True)
class Drained:
    """One forwarder run: requests acknowledged (Accounting-On, Starts, interims) and seconds."""

    requests: int
    interims: int
    seconds: float


def _meter(state_dir: Path, subscribers: int) -> MeterService:
    """The real usage stream of a gateway with `subscribers` (its journal is the outbox)."""
    slots = {i: f"s{i:04d}" for i in range(1, subscribers + 1)}
    any_port = "tcp://127.0.0.1:*"
    stream = StreamConfig(any_port, any_port, ServerSecurity(plaintext=True))
    return MeterService(GATEWAY, state_dir, stream, slots)


def _publish(
    service: MeterService, subscribers: int, intervals: int, step_ms: int
) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(7)
    ids = np.arange(1, subscribers + 1, dtype=np.uint32)
    totals = np.zeros((2, subscribers), dtype=np.uint64)
    pkts = np.ones(subscribers, dtype=np.uint64)
    for n in range(intervals):
        up = rng.integers(1, 50_000, subscribers, dtype=np.uint64)
        down = rng.integers(1, 500_000, subscribers, dtype=np.uint64)
        totals += np.stack([up, down])
        t0 = T0_MS + n * step_ms
        interval = UsageInterval(t0, t0 + step_ms, ids, up, down, pkts, pkts, totals[0], totals[1])
        service.publish(interval, {})
    return {f"s{i:04d}": (int(totals[0][i - 1]), int(totals[1][i - 1])) for i in ids}


def drain(
    server: FreeRadius,
    directory: Path,
    subscribers: int,
    intervals: int,
    step_ms: int,
    interim_s: int,
) -> Drained:
    """Journal `intervals` for `subscribers`, then time the forwarder draining it into radacct."""
    server.pg.psql("radius", "-c", "TRUNCATE radacct")
    service = _meter(directory, subscribers)
    endpoint = RadiusServer("127.0.0.1", server.port, server.secret.encode())
    config = AccountingConfig(servers=(endpoint,), interim_s=interim_s, stop_wait_s=60)
    try:
        # Built on the empty journal: its cursor is 0, so the whole backlog is the outage's.
        accounting = RadiusAccounting(GATEWAY, service.journal, directory, config)
        try:
            truth = _publish(service, subscribers, intervals, step_ms)
            start = time.perf_counter()
            accounting.start()
            if not accounting.wait_idle(3_600):
                raise DesanetError("RADIUS accounting did not catch up within an hour")
            seconds = time.perf_counter() - start
            sender = accounting.sender
            requests = sender.sent - sender.retransmitted
        finally:
            accounting.close()  # Stops and Accounting-Off: radacct complete
    finally:
        service.close()
    stored = _radacct_octets(server)
    if stored != truth:
        wrong = sorted(s for s in truth if stored.get(s) != truth[s])
        raise DesanetError(
            f"radacct differs from the journal for {len(wrong)} subscribers, e.g. "
            f"{[(s, stored.get(s), truth[s]) for s in wrong[:3]]}"
        )
    return Drained(requests, requests - subscribers - 1, seconds)


def _radacct_octets(server: FreeRadius) -> dict[str, tuple[int, int]]:
    out = server.pg.psql(
        "radius",
        "-c",
        "SELECT username, SUM(acctinputoctets), SUM(acctoutputoctets) FROM radacct "
        "GROUP BY username",
    )
    rows = [line.split("|") for line in out.splitlines() if line]
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def interims_per_s_for(
    server: FreeRadius, directory: Path, subscribers: int, rounds: int
) -> tuple[float, int]:
    """Interim-Updates/s the gateway's forwarder sustains for `subscribers` x `rounds`."""
    run = drain(server, directory, subscribers, rounds, 60_000, 60)
    return run.interims / run.seconds, run.interims


def radclient_interims_per_s(server: FreeRadius, directory: Path, count: int) -> float:
    """The peer: radclient sending `count` Interim-Updates from a file, WINDOW in parallel."""
    directory.mkdir(parents=True, exist_ok=True)
    packets = directory / "interims.txt"
    sessions = max(1, count // 10)
    with packets.open("w") as f:
        for n in range(count):
            sub = n % sessions
            f.write(
                f'User-Name = "p{sub:04d}"\nAcct-Status-Type = Interim-Update\n'
                f'Acct-Session-Id = "PEER{sub:012X}"\nNAS-Identifier = "{GATEWAY}"\n'
                f"NAS-IP-Address = 127.0.0.1\nAcct-Input-Octets = {n * 1000}\n"
                f"Acct-Output-Octets = {n * 9000}\nAcct-Session-Time = {n}\n"
                f"Event-Timestamp = {T0_MS // 1000 + n}\nMessage-Authenticator = 0x00\n\n"
            )
    secret = directory / "secret"
    secret.write_text(server.secret + "\n")
    secret.chmod(0o600)
    cmd = ["radclient", "-q", "-p", str(WINDOW), "-r", "5", "-t", "2", "-S", str(secret)]
    cmd += ["-f", str(packets), f"127.0.0.1:{server.port}", "acct"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3_600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise DesanetError(f"radclient failed ({done.returncode}): {done.stderr[-500:]}")
    return count / seconds


def bench(report: Report, size: dict[str, int], directory: Path) -> None:
    with postgres_cluster() as pg, radius_lab.freeradius_server(pg, debug=False) as server:
        ours, count = interims_per_s_for(
            server, directory / "interims", size["subscribers"], size["rounds"]
        )
        peer = radclient_interims_per_s(server, directory / "peer", count)
        report.add(
            case=f"Interim-Updates, {size['subscribers']} sessions",
            requests=count,
            desanet_per_s=ours,
            radclient_per_s=peer,
            ratio=ours / peer,
        )
        catchup = drain(
            server,
            directory / "catchup",
            size["catchup_subscribers"],
            size["catchup_s"],
            1_000,
            DEFAULT_INTERIM_S,
        )
        report.add(
            case=f"catch-up: {size['catchup_s']} s of {size['catchup_subscribers']} subscribers",
            requests=catchup.requests,
            desanet_per_s=catchup.requests / catchup.seconds,
            seconds=catchup.seconds,
        )
    report.headline["interims_per_s"] = ours
    report.headline["vs_radclient"] = ours / peer
    report.headline["catchup_1d_s"] = catchup.seconds


def main() -> None:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "radius")
    size = QUICK if args.quick else FULL
    report = Report(
        "radius",
        ["case", "requests", "desanet_per_s", "radclient_per_s", "ratio", "seconds"],
        quick=args.quick,
    )
    reason = radius_lab.missing() or (
        None if shutil.which("radclient") else "radclient is missing (Debian freeradius-utils)"
    )
    if reason is not None:
        report.skip(args, reason)
        return
    # The journals go to memory when it can: writing them is set-up, not the figure.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        prefix="desanet-bench-radius-", dir=shm if shm.is_dir() else None
    ) as tmp:
        bench(report, size, Path(tmp))
    report.notes.append(
        "desanet: the gateway's RadiusAccounting draining a journal (window 32, one request "
        "in flight per session), timed from start to the last acknowledgement, radacct checked "
        "against the journal; radclient: the same count of Interim-Updates from a file, -p 32"
    )
    report.notes.append(
        "catch-up: every 1 s interval journaled, every subscriber moving, interim 5 min"
    )
    if args.quick:
        report.notes.append(
            f"quick run: catchup_1d_s is {size['catchup_s']} s of journal for "
            f"{size['catchup_subscribers']} subscribers, interims for {size['subscribers']}"
        )
    report.finish(args)


if __name__ == "__main__":
    main()
