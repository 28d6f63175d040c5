"""`[latency]` and the adaptive link rate's keys of `[link]`: defaults, bounds, errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from desanet.errors import ConfigError
from desanet.gateway.config import Config, parse_config
from desanet.gateway.datapath_commands import SpawnedDatapath

pytestmark = pytest.mark.unit

BASE = """\
[gateway]
id = "desa-sukamaju"
lan = "br-lan"
state_dir = "state"

[link]
down = "20mbit"
up = "5mbit"
{link}
[publish]
usage = "tcp://127.0.0.1:7570"
replay = "tcp://127.0.0.1:7571"
plaintext = true

[subscribers]
file = "subscribers.csv"
{extra}"""


def parse(link: str = "", extra: str = "") -> Config:
    return parse_config(BASE.format(link=link, extra=extra), Path("/etc/desanet/gateway.toml"))


def test_tracking_is_on_and_the_rate_fixed_by_default() -> None:
    cfg = parse()
    assert cfg.latency.track is True and cfg.latency.window_ms == 60_000
    assert cfg.adapt is None


def test_adapt_with_default_and_given_bounds() -> None:
    cfg = parse('adapt = true\ndown_min = "4mbit"\n')
    adapt = cfg.adapt
    assert (adapt.down_min_bps, adapt.down_max_bps) == (4_000_000, 20_000_000)
    assert (adapt.up_min_bps, adapt.up_max_bps) == (1_250_000, 5_000_000)


@pytest.mark.parametrize(
    ("link", "extra", "message"),
    [
        ('adapt = true\ndown_min = "30mbit"', "", r"\[link\] down_min: needs down_min <= down"),
        ('adapt = true\nup_max = "4mbit"', "", r"\[link\] up_min: needs up_min <= up <= up_max"),
        ("adapt = true", "[latency]\ntrack = false\n", r"\[link\] adapt: .*track = true"),
        ("", '[latency]\nwindow = "1s"\n', r"\[latency\] window: 1000 ms must be 10s to 1h"),
        ("adapt = 1", "", r"\[link\] adapt: expected a bool"),
    ],
)
def test_bad_latency_settings_are_named(link: str, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(link, extra)


def test_tracking_off_reaches_the_datapath_loader(tmp_path: Path) -> None:
    on = SpawnedDatapath("br-lan", "gw1", capacity=16, bpffs=tmp_path)
    off = SpawnedDatapath("br-lan", "gw1", capacity=16, bpffs=tmp_path, rtt_track=False)
    assert "--no-rtt" not in on.loader_command()
    assert off.loader_command()[-1] == "--no-rtt"
    attach = subprocess.run(
        [*off.loader_command()[:6], "--help"], capture_output=True, text=True, check=True
    )
    assert "--no-rtt" in attach.stdout
