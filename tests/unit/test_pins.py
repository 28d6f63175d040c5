"""Finding the program of a tc filter in raw netlink, and the refusal of a dying bpffs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from desanet.ebpf import bpffs, tc
from desanet.errors import DatapathError

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
