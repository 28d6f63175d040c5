"""`desanet run` with `[radius]` in a lab village: radacct is the traffic, CoA changes the rate.

FreeRADIUS (its own raddb, sql module into a throwaway PostgreSQL) runs in
the gateway's namespace, where the service reaches it on loopback and where
radclient, the billing server, sends its requests. Truth: the nftables
counters in the subscribers' own namespaces, and iperf3's measured rates.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from desanet.gateway.lab import INET_V4, Village, in_netns, village
from tests.kernel.test_gateway import Service, row
from tests.pg_harness import postgres_cluster
from tests.radius_harness import FreeRadius, freeradius_server

pytestmark = pytest.mark.kernel

COA_SECRET = "radius-lab-coa-secret"


def _secret(path: Path, secret: str) -> str:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path.name


def _radius_section(folder: Path, fr: FreeRadius) -> str:
    return (
        f'\n[radius]\nservers = ["127.0.0.1:{fr.port}"]\n'
        f'secret_file = "{_secret(folder / "radius.secret", fr.secret)}"\n'
        'coa_listen = "127.0.0.1:3799"\n'
        f'coa_clients = [{{address = "127.0.0.1", '
        f'secret_file = "{_secret(folder / "coa.secret", COA_SECRET)}"}}]\n'
    )


def _radclient(
    command: str, attrs: str, secret: str = COA_SECRET, ma: bool = True, wait_s: int = 3
) -> str:
    # Run from this thread, which is in the gateway's namespace (see the test).
    body = attrs + ("\nMessage-Authenticator = 0x00" if ma else "")
    done = subprocess.run(
        ["radclient", "-x", "-r", "1", "-t", str(wait_s), "127.0.0.1:3799", command, secret],
        input=body.encode(),
        capture_output=True,
        timeout=20,
    )
    return done.stdout.decode() + done.stderr.decode()


def _download_bps(lab: Village, port: int) -> float:
    """iperf3 TCP download rate of subscriber 1 through the gateway, bit/s received."""
    server = lab.popen(lab.inet_ns, ["iperf3", "-s", "-1", "-p", str(port)],
                       stdout=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.3)
    client = lab.popen(
        lab.subscribers[0].netns,
        ["iperf3", "-c", INET_V4, "-p", str(port), "-R", "-t", "3", "-O", "1", "-J"],
        stdout=subprocess.PIPE,
    )
    out, _ = client.communicate(timeout=30)
    server.wait(timeout=10)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def test_radacct_is_the_traffic_and_coa_changes_the_measured_rate(tmp_path: Path) -> None:
    # FreeRADIUS, and every radclient below, in the gateway's namespace.
    with (
        village(2) as lab,
        postgres_cluster() as pg,
        in_netns(lab.gw_ns),
        freeradius_server(pg, debug=False) as fr,
    ):
        svc = Service(lab, tmp_path)
        svc.config.write_text(svc.config.read_text() + _radius_section(tmp_path, fr))
        svc.write_subscribers([row(lab, 1), row(lab, 2)])
        svc.start()
        for sub in lab.subscribers:
            lab.reset_truth(sub)  # ground truth from the moment the datapath counts
        try:
            # Paced pings far below every plan: what each namespace sent and received
            # is what was delivered.
            pings = [
                lab.popen(sub.netns, ["ping", "-q", "-i", "0.01", "-s", "1000", INET_V4],
                          stdout=subprocess.DEVNULL)
                for sub in lab.subscribers
            ]  # fmt: skip
            time.sleep(2)
            for ping in pings:
                ping.send_signal(signal.SIGINT)
                ping.wait(timeout=10)
            before = _download_bps(lab, 5401)
            # MikroTik's rx/tx from the router: 2M up (rx), 3M down (tx).
            out = _radclient("coa", 'User-Name = "s1"\nMikrotik-Rate-Limit = "2M/3M"')
            assert "Received CoA-ACK" in out, out
            after = _download_bps(lab, 5402)
            coa = 'User-Name = "s1"\nMikrotik-Rate-Limit = "1M/1M"'
            for wrong in (
                _radclient("coa", coa, secret="not-the-secret", wait_s=1),
                _radclient("coa", coa, ma=False, wait_s=1),
            ):
                assert "No reply from server" in wrong, wrong
            truth = {f"s{sub.index}": lab.truth(sub) for sub in lab.subscribers}
        finally:
            svc.kill(signal.SIGTERM)  # Stop of every session, Accounting-Off
            svc.stop_detach()
        radacct = fr.octets_by_user()
        causes = fr.query("SELECT DISTINCT acctterminatecause FROM radacct")
    assert before > 8_000_000, before  # the file's plan: 10 Mbit/s down
    assert after == pytest.approx(3_000_000, rel=0.15), after
    assert set(radacct) == {"s1", "s2"}
    for user, t in truth.items():
        up, down = radacct[user]
        assert up == pytest.approx(t.up_bytes, rel=1e-3), (user, up, t)
        assert down == pytest.approx(t.down_bytes, rel=1e-3), (user, down, t)
    assert causes == [("Admin-Reboot",)]
