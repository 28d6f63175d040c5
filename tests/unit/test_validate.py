"""The bottom layer's rules: one definition of ids, endpoints, loopback and durable writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from desanet.durable import replace_atomically
from desanet.errors import ValidationError
from desanet.validate import (
    check_endpoint,
    check_gateway_id,
    check_subscriber_id,
    is_loopback,
    parse_host_port,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("good", ["desa-sukamaju", "a", "0", "d" * 63])
def test_gateway_ids_accepted(good: str) -> None:
    assert check_gateway_id(good) == good


@pytest.mark.parametrize("bad", ["", "Desa", "desa_1", "desa.1", "-lead", "d" * 64, "a b", "../x"])
def test_gateway_ids_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="gateway id"):
        check_gateway_id(bad)


@pytest.mark.parametrize("bad", ["", "_x", "s 1", "s/1", "x" * 65])
def test_subscriber_ids_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="subscriber id"):
        check_subscriber_id(bad)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:7570",
        "tcp://[::1]:7570",
        "tcp://[fd00::1]:1",
        "tcp://gw.lan:65535",
        "tcp://*:7570",
        "tcp://127.0.0.1:*",
        "ipc:///run/desanet/usage",
    ],
)
def test_endpoints_accepted(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:99999",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1",
        "tcp://::1:7570",
        "tcp://[zz::1]:7570",
        "udp://127.0.0.1:1",
        "ipc://",
        "ipc://a b",
        "127.0.0.1:7570",
    ],
)
def test_endpoints_refused(endpoint: str) -> None:
    with pytest.raises(ValidationError):
        check_endpoint(endpoint)


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:7570", True),
        ("tcp://127.0.0.2:7570", True),
        ("tcp://[::1]:7570", True),
        ("tcp://localhost:7570", True),
        ("ipc:///tmp/x", True),
        ("tcp://0.0.0.0:7570", False),
        ("tcp://*:7570", False),
        ("tcp://[::]:7570", False),
        ("tcp://10.0.0.1:7570", False),
        ("tcp://[::ffff:10.0.0.1]:7570", False),
        ("tcp://gw.example:7570", False),
    ],
)
def test_loopback_is_one_rule(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


def test_host_port_keeps_ipv6_without_brackets() -> None:
    hp = parse_host_port("[fd00::7]:9570")
    assert (hp.host, hp.port, str(hp)) == ("fd00::7", 9570, "[fd00::7]:9570")


def test_replace_atomically_writes_private_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    replace_atomically(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_replace_atomically_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        replace_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
