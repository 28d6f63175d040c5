"""`[fleet]` in gateway.toml: the running service forwards its journal to a real hub.

The service loop runs with the kernel parts faked (tests/unit/service_lab.py)
and the real usage stream; the hub is a nats-server configured by `desanet hub
init` (TLS, this gateway's own NKEY). At the end the hub's stream holds every
journaled message once, bytes unchanged, named `<gw>:<epoch>:<seq>`, also
across a restart of the service in the middle.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from desanet.errors import ConfigError
from desanet.gateway.config import load_config
from tests.fleet_harness import fleet_hub, read_stream
from tests.unit.service_lab import S1, S2, Lab

pytestmark = pytest.mark.unit

GATEWAY = "desa-loop"


def _fleet_section(servers: list[str], credentials: Path, ca: Path) -> str:
    quoted = ", ".join(f'"{s}"' for s in servers)
    return f'\n[fleet]\nservers = [{quoted}]\ncredentials = "{credentials}"\nca = "{ca}"\n'


def test_the_service_forwards_every_journaled_message_to_the_hub(tmp_path: Path) -> None:
    with fleet_hub(tmp_path / "hub", [GATEWAY]) as hub:
        (tmp_path / "gw").mkdir()
        lab = Lab(tmp_path / "gw")
        config = lab.folder / "gateway.toml"
        fleet = _fleet_section(hub.nats.urls, hub.files.gateways[GATEWAY], hub.tls.ca)
        config.write_text(config.read_text() + fleet)
        lab.write(S1, S2)
        for run in range(2):  # a restart in the middle: forwarding resumes from the cursor
            service = lab.service()
            service.start()
            try:
                for i in range(20):
                    lab.datapath.send("10.0.0.1", up=100 + i, down=1_000 + run)
                    lab.datapath.send("10.0.0.2", down=50)
                    lab.tick(service)
            finally:
                service.close()
        assert lab.meter is not None
        journal = lab.meter.journal
        journaled = journal.read(1, 10**6)
        stored = read_stream(hub)
        epoch = lab.meter.epoch
        assert [m.msg_id for m in stored] == [f"{GATEWAY}:{epoch}:{seq}" for seq, _ in journaled]
        assert [m.data for m in stored] == [data for _, data in journaled], "bytes changed"
        assert {m.subject for m in stored} == {f"desanet.usage.{GATEWAY}"}
        assert len(journaled) >= 40


def test_fleet_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    config = lab.folder / "gateway.toml"
    base = config.read_text()
    config.write_text(base + '\n[fleet]\nservers = ["http://hub:4222"]\ncredentials = "x.nk"\n')
    with pytest.raises(ConfigError, match=r"\[fleet\] servers: 'http://hub:4222'"):
        load_config(config)
    config.write_text(base + '\n[fleet]\nservers = ["tls://hub:4222"]\ncredentials = "none.nk"\n')
    lab.write(S1)
    with pytest.raises(ConfigError, match=r"fleet credentials .*none\.nk"):
        lab.service().start()
