"""Pins that outlive the service: a filter's program in raw netlink, the refusal of a dying
bpffs, the loader child's errors, and a service process that never imports BCC."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from desanet.ebpf import bpffs, tc
from desanet.errors import DatapathError
from desanet.gateway.datapath_commands import SpawnedDatapath

pytestmark = pytest.mark.unit


def _nla(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def test_program_id_is_found_among_the_filter_options() -> None:
    # As the kernel sends a cls_bpf filter: name, tag, id, flags (TCA_OPTIONS is nested).
    inner = (
        _nla(7, b"desanet_ingress\0")
        + _nla(10, bytes(8))
        + _nla(tc.TCA_BPF_ID, struct.pack("=I", 1616))
        + _nla(8, struct.pack("=I", 1))
    )
    assert tc.bpf_prog_id(_nla(0x8000 | 2, inner)) == 1616


def test_options_without_a_program_id_give_zero() -> None:
    assert tc.bpf_prog_id(_nla(2, _nla(7, b"other\0"))) == 0
    assert tc.bpf_prog_id(b"\x04\x00\x02\x00\x00\x00") == 0  # a truncated attribute


def test_a_private_namespace_without_bpffs_is_refused_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bpffs, "in_initial_mount_namespace", lambda: False)
    with pytest.raises(DatapathError) as caught:
        bpffs.durable(tmp_path)
    message = str(caught.value)
    assert "nsenter --net=" in message and "ip netns exec" in message
    assert str(tmp_path) in message


def test_the_initial_namespace_is_only_checked_when_mounting_is_not_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bpffs, "in_initial_mount_namespace", lambda: True)
    assert "to be mounted" in bpffs.durable(tmp_path, mount=False).why
    assert not bpffs.is_bpffs(tmp_path)


def test_the_loader_child_error_becomes_the_service_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    datapath = SpawnedDatapath(
        "br-lan", "gw1", capacity=16, upload_ifb="ifb-br-lan", bpffs=tmp_path
    )
    command = datapath.loader_command()
    assert command[command.index("--capacity") + 1] == "16"
    assert command[command.index("--upload-ifb") + 1] == "ifb-br-lan"
    assert command[command.index("--bpffs") + 1] == str(tmp_path)
    failing = "import sys; print('desanet: error: no kernel headers', file=sys.stderr); sys.exit(2)"
    monkeypatch.setattr(bpffs, "durable", lambda root, mount=True: bpffs.Bpffs(root, "test"))
    monkeypatch.setattr(datapath, "loader_command", lambda: [sys.executable, "-c", failing])
    with pytest.raises(DatapathError, match=r"^no kernel headers$"):
        datapath.attach()


def test_the_service_imports_no_compiler() -> None:
    code = (
        "import sys, desanet.gateway.cli, desanet.gateway.service, desanet.gateway.compose; "
        "print(sorted(m for m in sys.modules if m == 'bcc' or m.startswith('bcc.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_loader_child_log_lines_keep_their_level(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    datapath = SpawnedDatapath("br-lan", "gw1", capacity=16, bpffs=tmp_path)
    lines = (
        "2026-12-01 10:00:00,000 WARNING desanet.ebpf.datapath: pinned its maps again\n"
        "desanet: error: interface 'br-lan' does not exist\n"
    )
    child = f"import sys; sys.stderr.write({lines!r}); sys.exit(2)"
    monkeypatch.setattr(bpffs, "durable", lambda root, mount=True: bpffs.Bpffs(root, "test"))
    monkeypatch.setattr(datapath, "loader_command", lambda: [sys.executable, "-c", child])
    with pytest.raises(DatapathError, match="does not exist"):
        datapath.attach()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "loader: desanet.ebpf.datapath: pinned its maps again")
    ]
