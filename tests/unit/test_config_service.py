"""Every error class `desanet run` refuses with, end to end through the CLI, before any change.

The service is checked as a whole here (TOML, subscribers file, keys, shaping
plan) the way an operator meets it: exit status 2, one line naming the file,
the line and the field, and no state directory created.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from desanet.gateway.cli import main
from desanet.gateway.service import GatewayService
from desanet.meter.keys import generate_keypair, load_keypair

pytestmark = pytest.mark.unit

CONFIG = """\
[gateway]
id = "desa-test"
lan = "lo"
state_dir = "state"

[link]
down = "20mbit"
up = "5mbit"

[publish]
usage = "tcp://127.0.0.1:7570"
replay = "tcp://127.0.0.1:7571"
secret_key = "keys/gateway.key_secret"
allowed_keys = "allowed"

[subscribers]
file = "subscribers.csv"
"""
SUBSCRIBERS = """\
id,name,prefixes,down_min,down_max,up_min,up_max,quota
s1,A,10.0.0.1,1mbit,10mbit,256kbit,2mbit,10GB
s2,B,10.0.1.0/24 fd00::/64,1mbit,10mbit,256kbit,2mbit,
"""

CASES = [
    # (file, old, new, expected message)
    ("toml", 'up = "5mbit"', 'up = "5mbit', r"gateway.toml:8: not valid TOML"),
    ("toml", "[link]", "[lnik]", r"gateway.toml:6: \[lnik\]: unknown section"),
    ("toml", 'up = "5mbit"', 'upp = "5mbit"', r"gateway.toml:8: \[link\] upp: unknown field"),
    ("toml", 'up = "5mbit"\n', "", r"gateway.toml:6: \[link\]: missing field 'up'"),
    ("toml", 'down = "20mbit"', "down = 20", r"gateway.toml:7: \[link\] down: expected a str"),
    ("toml", 'down = "20mbit"', 'down = "20mbs"', r":7: \[link\] down: rate '20mbs': unknown unit"),
    ("toml", 'id = "desa-test"', 'id = "Desa Test"', r":2: \[gateway\] id: 'Desa Test'"),
    (
        "toml",
        'lan = "lo"',
        'lan = "dnx-nolan"',
        r":3: \[gateway\] lan: interface 'dnx-nolan' does not",
    ),
    ("toml", "[subscribers]", '[shaping]\nleaf = "sfq"\n[subscribers]', r"\[shaping\] leaf: 'sfq'"),
    ("toml", "[subscribers]", '[meter]\ninterval = "1ms"\n[subscribers]', r"\[meter\] interval"),
    ("toml", 'secret_key = "keys/gateway.key_secret"\n', "", r"\[publish\]: set secret_key"),
    ("toml", "keys/gateway.key_secret", "keys/none", r"cannot read CURVE key file .*keys/none"),
    (
        "toml",
        'secret_key = "keys/gateway.key_secret"\nallowed_keys = "allowed"',
        'plaintext = true\nusage2 = "x"',
        r"\[publish\] usage2: unknown field",
    ),
    ("csv", "id,name", "ident,name", r"subscribers.csv:1: header must be exactly"),
    ("csv", "10.0.0.1,", "10.0.0.1/8,", r"subscribers.csv:2: prefixes: subscriber s1: prefix"),
    (
        "csv",
        "10.0.0.1,",
        "10.0.1.9,",
        r":3: prefixes: subscriber s2: prefix 10.0.1.0/24 overlaps 10.0.1.9 of s1",
    ),
    ("csv", "s1,A,10.0.0.1,1mbit", "s1,A,10.0.0.1,11mbit", r":2: down_min: subscriber s1: 11.0"),
    ("csv", "256kbit,2mbit,10GB", "256kbit,6mbit,10GB", r":2: up_max: .*above the link's 5.0"),
    ("csv", "10GB", "10 gigs", r":2: quota: subscriber s1: size '10 gigs'"),
    ("csv", "s2,B", "s1,B", r":3: id: subscriber s1 already defined on line 2"),
    (
        "csv",
        "s1,A,10.0.0.1,1mbit,10mbit",
        "s1,A,10.0.0.1,19500kbit,20mbit",
        r"subscribers.csv: subscriber s1: its download min 19.5 Mbit/s brings the sum of "
        r"guaranteed rates to 19.5 Mbit/s, above the 18.8 Mbit/s the link can guarantee",
    ),
    (
        "csv",
        "s1,A,10.0.0.1,1mbit,10mbit",
        "s1,A,10.0.0.1,18900kbit,20mbit",
        r"subscribers.csv: subscriber s1: its download min 18.9 Mbit/s brings the sum",
    ),
]


@pytest.mark.parametrize(("which", "old", "new", "message"), CASES)
def test_run_refuses_with_file_line_and_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    which: str,
    old: str,
    new: str,
    message: str,
) -> None:
    # Should a case ever pass the checks, it must not reach the kernel of the test machine.
    monkeypatch.setattr(
        GatewayService, "start", lambda self: pytest.fail("the checks let it through")
    )
    generate_keypair(tmp_path / "keys", "gateway")
    generate_keypair(tmp_path / "allowed", "billing")
    config, subscribers = CONFIG, SUBSCRIBERS
    if which == "toml":
        assert old in config
        config = config.replace(old, new, 1)
    else:
        assert old in subscribers
        subscribers = subscribers.replace(old, new, 1)
    (tmp_path / "gateway.toml").write_text(config)
    (tmp_path / "subscribers.csv").write_text(subscribers)
    assert main(["run", "--config", str(tmp_path / "gateway.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("desanet: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "state").exists()


def test_check_accepts_the_good_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_keypair(tmp_path / "keys", "gateway")
    generate_keypair(tmp_path / "allowed", "billing")
    (tmp_path / "gateway.toml").write_text(CONFIG)
    (tmp_path / "subscribers.csv").write_text(SUBSCRIBERS)
    assert main(["run", "--check", "--config", str(tmp_path / "gateway.toml")]) == 0
    assert "ok, 2 subscribers" in capsys.readouterr().out


def test_keygen_creates_the_secret_key_private_from_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    old_umask = os.umask(0)  # the widest: nothing but the mode given at creation protects it
    try:
        assert main(["keygen", "gateway", "--dir", str(tmp_path)]) == 0
    finally:
        os.umask(old_umask)
    secret = tmp_path / "gateway.key_secret"
    [(_, flags, mode)] = [c for c in created if c[0] == str(secret)]
    assert flags & os.O_EXCL and mode == 0o600
    assert secret.stat().st_mode & 0o777 == 0o600
    assert load_keypair(secret).secret is not None
    assert load_keypair(tmp_path / "gateway.key").public == load_keypair(secret).public
    before = secret.read_bytes()
    assert main(["keygen", "gateway", "--dir", str(tmp_path)]) == 2
    assert "gateway.key_secret exists: keep it" in capsys.readouterr().err
    assert secret.read_bytes() == before
