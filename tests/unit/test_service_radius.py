"""`[radius]` in gateway.toml: the running service accounts to FreeRADIUS and obeys its CoA.

The service loop runs with the kernel parts faked (tests/unit/service_lab.py)
and the real usage stream and control path; FreeRADIUS is Debian's, writing
radacct to a real PostgreSQL (tests/radius_harness.py), and radclient
(freeradius-utils) is the billing server sending Disconnect and CoA.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from desanet.errors import ConfigError
from desanet.gateway.config import load_config
from desanet.gateway.radius_part import RadiusPart
from desanet.gateway.service import GatewayService
from tests.pg_harness import postgres_cluster
from tests.radius_harness import FreeRadius, freeradius_server
from tests.unit.service_lab import HEADER, S1, S2, S3, Lab

pytestmark = pytest.mark.unit

COA_SECRET = "billing-coa-secret"


@pytest.fixture(scope="module")
def fr() -> Iterator[FreeRadius]:
    if shutil.which("radclient") is None:
        pytest.fail("radclient is not installed: run `make setup` (Debian freeradius-utils)")
    with postgres_cluster() as pg, freeradius_server(pg, debug=False) as server:
        yield server


def _secret(path: Path, secret: str) -> Path:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def radius_section(lab: Lab, fr: FreeRadius) -> str:
    acct = _secret(lab.folder / "radius.secret", fr.secret)
    coa = _secret(lab.folder / "coa.secret", COA_SECRET)
    return (
        "\n[radius]\n"
        f'servers = ["127.0.0.1:{fr.port}"]\n'
        f'secret_file = "{acct.name}"\n'
        'interim = "1m"\n'
        'coa_listen = "127.0.0.1:*"\n'
        f'coa_clients = [{{address = "127.0.0.1", secret_file = "{coa.name}"}}]\n'
    )


def radclient(service: GatewayService, command: str, attrs: str) -> str:
    """radclient's output for one request, answered by the running service loop."""
    part = service.parts.radius
    assert isinstance(part, RadiusPart) and part.coa is not None
    port = part.coa.port
    outcome: list[str] = []

    def send() -> None:
        done = subprocess.run(
            ["radclient", "-x", "-r", "1", "-t", "3", f"127.0.0.1:{port}", command, COA_SECRET],
            input=(attrs + "\nMessage-Authenticator = 0x00").encode(),
            capture_output=True,
            timeout=20,
        )
        outcome.append(done.stdout.decode() + done.stderr.decode())

    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive():
        service.step()
    sender.join()
    return outcome[0]


def test_the_service_accounts_to_radacct_and_a_coa_changes_the_plan(
    tmp_path: Path, fr: FreeRadius
) -> None:
    fr.query("DELETE FROM radacct")
    lab = Lab(tmp_path)
    config = lab.folder / "gateway.toml"
    config.write_text(config.read_text() + radius_section(lab, fr))
    lab.write(S1, S2, S3)
    service = lab.service()
    service.start()
    try:
        for i in range(90):  # 90 s of journal time: a Start and an Interim-Update each
            lab.datapath.send("10.0.0.1", up=1_000 + i, down=20_000 + i)
            lab.datapath.send("10.0.0.2", up=500, down=9_000)
            lab.datapath.send("10.0.0.3", up=70, down=1_300)
            lab.tick(service)
        # MikroTik's rx/tx from the router: 1M up (rx), 4M down (tx).
        out = radclient(service, "coa", 'User-Name = "s2"\nMikrotik-Rate-Limit = "1M/4M"')
        assert "Received CoA-ACK" in out, out
        slot = service.roster.slots.slots["s2"]
        assert lab.shaper.ceilings_bps(slot) == (4_000_000, 1_000_000)
        out = radclient(service, "disconnect", "Framed-IP-Address = 10.0.0.3")
        assert "Received Disconnect-ACK" in out, out
        for _ in range(5):  # s3 is cut off: no more traffic of it
            lab.datapath.send("10.0.0.1", up=10, down=10)
            lab.datapath.send("10.0.0.2", up=10, down=10)
            lab.tick(service)
        assert ("s2", "plan") in lab.events()
        assert ("s3", "suspend") in lab.events()
        lab.write(S2, S3)  # s1 leaves the subscribers file
        lab.settle(service)
        lab.datapath.send("10.0.0.2", up=1, down=1)
        lab.tick(service)
        billed = lab.billed()
    finally:
        service.close()  # nothing moved since: the last flush adds no usage
    assert fr.octets_by_user() == billed
    rows = fr.query(
        "SELECT username, acctterminatecause, framedipaddress::text FROM radacct "
        "WHERE acctstoptime IS NOT NULL ORDER BY username"
    )
    assert rows == [
        ("s1", "Admin-Reset", "10.0.0.1/32"),
        ("s2", "Admin-Reboot", "10.0.0.2/32"),
        ("s3", "Port-Suspended", "10.0.0.3/32"),
    ]
    # A restart with no traffic: nothing is counted twice.
    service = lab.service()
    service.start()
    try:
        lab.tick(service)
    finally:
        service.close()
    assert fr.octets_by_user() == billed


def test_the_radius_user_column_is_the_user_name_in_radacct_and_in_a_coa(
    tmp_path: Path, fr: FreeRadius
) -> None:
    fr.query("DELETE FROM radacct")
    lab = Lab(tmp_path)
    config = lab.folder / "gateway.toml"
    config.write_text(config.read_text() + radius_section(lab, fr))

    def write(*rows: str) -> None:
        tmp = lab.folder / "subscribers.tmp"
        tmp.write_text(HEADER.replace("quota", "quota,radius_user,mac") + "\n".join(rows) + "\n")
        tmp.replace(lab.folder / "subscribers.csv")

    # s2's MAC is its Calling-Station-Id, s3's IPv6 address its Framed-IPv6-Prefix.
    write(S1 + ",budi@rt05,", S2 + ",,02:00:00:00:00:02", S3 + ",,")
    service = lab.service()
    service.start()
    try:
        for _ in range(3):
            lab.datapath.send("10.0.0.1", up=1_000, down=20_000)
            lab.datapath.send("10.0.0.2", up=500, down=9_000)
            lab.datapath.send("fd00::3", up=40, down=60)
            lab.tick(service)
        out = radclient(service, "coa", 'User-Name = "budi@rt05"\nMikrotik-Rate-Limit = "1M/4M"')
        assert "Received CoA-ACK" in out, out
        assert lab.shaper.ceilings_bps(service.roster.slots.slots["s1"]) == (4_000_000, 1_000_000)
        # Billing knows s1 only by its radius_user now.
        out = radclient(service, "disconnect", 'User-Name = "s1"')
        assert "Received Disconnect-NAK" in out, out
        before = lab.billed()["s1"]
        # A new name: the session ends under the old one, the next one has the new name.
        write(S1 + ",sari@rt05,", S2 + ",,02:00:00:00:00:02", S3 + ",,")
        lab.settle(service)
        for _ in range(3):
            lab.datapath.send("10.0.0.1", up=3_000, down=7_000)
            lab.tick(service)
        billed = lab.billed()
    finally:
        service.close()
    rows = fr.query(
        "SELECT username, acctterminatecause, framedipaddress::text, framedipv6prefix::text, "
        "callingstationid FROM radacct WHERE acctstoptime IS NOT NULL ORDER BY username"
    )
    assert rows == [
        ("budi@rt05", "Admin-Reset", "10.0.0.1/32", None, ""),
        ("s2", "Admin-Reboot", "10.0.0.2/32", None, "02:00:00:00:00:02"),
        ("s3", "Admin-Reboot", "10.0.0.3/32", "fd00::3/128", ""),
        ("sari@rt05", "Admin-Reboot", "10.0.0.1/32", None, ""),
    ]
    after = (billed["s1"][0] - before[0], billed["s1"][1] - before[1])
    octets = fr.octets_by_user()
    assert octets == {
        "budi@rt05": before,
        "sari@rt05": after,
        "s2": billed["s2"],
        "s3": billed["s3"],
    }
    assert after == (9_000, 21_000)


def test_radius_settings_are_checked_before_anything_starts(tmp_path: Path, fr: FreeRadius) -> None:
    lab = Lab(tmp_path)
    config = lab.folder / "gateway.toml"
    base = config.read_text()
    section = radius_section(lab, fr)
    config.write_text(base + section.replace(f"127.0.0.1:{fr.port}", "radius-1"))
    with pytest.raises(ConfigError, match=r"\[radius\] servers: 'radius-1': use host:port"):
        load_config(config)
    config.write_text(base + section.replace('"1m"', '"30s"'))
    with pytest.raises(ConfigError, match=r"\[radius\] interim: 30000 ms must be between 1m"):
        load_config(config)
    config.write_text(base + section)
    (lab.folder / "radius.secret").chmod(0o640)
    lab.write(S1)
    with pytest.raises(ConfigError, match=r"\[radius\] secret_file .*radius\.secret: readable by"):
        lab.service().start()
