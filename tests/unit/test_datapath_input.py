"""Datapath input checks that need neither root nor a kernel."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from desanet.ebpf import datapath as datapath_module
from desanet.ebpf.datapath import Datapath, compile_program
from desanet.errors import DatapathError, ValidationError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("gateway_id", ["", "desa sukamaju", "../etc", "a" * 64, "-lead"])
def test_gateway_id_must_be_a_safe_name(gateway_id: str) -> None:
    with pytest.raises(ValidationError, match="gateway id"):
        Datapath("br-lan", gateway_id)


@pytest.mark.parametrize("capacity", [0, -5, 4_000_001])
def test_capacity_range(capacity: int) -> None:
    with pytest.raises(ValidationError, match="capacity"):
        Datapath("br-lan", "desa-sukamaju", capacity=capacity)


def test_not_root_is_refused_before_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(datapath_module.os, "geteuid", lambda: 1000)
    dp = Datapath("br-lan", "desa-sukamaju", bpffs=tmp_path)
    with pytest.raises(DatapathError, match="needs root"):
        dp.attach()
    assert list(tmp_path.iterdir()) == []


def test_missing_kernel_headers_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(platform, "release", lambda: "0.0-no-such-kernel")
    with pytest.raises(
        DatapathError, match=r"kernel headers at /lib/modules/0\.0-no-such-kernel/build"
    ):
        compile_program(16, tmp_path)


def test_maps_need_an_attached_datapath() -> None:
    dp = Datapath("br-lan", "desa-sukamaju")
    with pytest.raises(DatapathError, match="not attached"):
        dp.read_counters()
