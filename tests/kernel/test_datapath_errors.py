"""Bad input to the datapath gives one clear error and leaves nothing half-attached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from desanet.ebpf import datapath as datapath_module
from desanet.ebpf.datapath import Datapath, Provision
from desanet.errors import DatapathError, ValidationError
from desanet.gateway.lab import in_netns, run

pytestmark = pytest.mark.kernel


def nothing_attached(netns: str, dev: str, dp: Datapath) -> bool:
    qdiscs = run(["tc", "qdisc", "show", "dev", dev], netns)
    return "clsact" not in qdiscs and not dp.pin_dir.exists()


def test_unknown_interface(netns_pair: tuple[str, str]) -> None:
    netns, _ = netns_pair
    with in_netns(netns):
        dp = Datapath("br-nowhere", f"err{os.getpid()}", capacity=8)
        with pytest.raises(DatapathError, match="interface 'br-nowhere' does not exist"):
            dp.attach()
    assert not dp.pin_dir.exists()


def test_compile_failure_leaves_nothing(
    netns_pair: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netns, dev = netns_pair
    broken = tmp_path / "datapath.bpf.c"
    broken.write_text(
        datapath_module.SOURCE.read_text().replace("return TC_ACT_OK;", "return TC_ACT_OK", 1)
    )
    monkeypatch.setattr(datapath_module, "SOURCE", broken)
    with in_netns(netns):
        dp = Datapath(dev, f"err{os.getpid()}", capacity=8)
        with pytest.raises(DatapathError, match="did not compile"):
            dp.attach()
    assert nothing_attached(netns, dev, dp)


def test_capacity_is_enforced(netns_pair: tuple[str, str]) -> None:
    netns, dev = netns_pair
    with in_netns(netns):
        dp = Datapath(dev, f"err{os.getpid()}", capacity=2)
        dp.attach()
        try:
            with pytest.raises(ValidationError, match=r"slot 3 is outside 1\.\.2"):
                dp.provision(3, ["10.0.0.3"])
            # The trie holds 4 prefixes per subscriber slot: 8 here, and a 9th is refused.
            dp.provision(1, [f"10.0.1.{i}" for i in range(4)])
            dp.provision(2, [f"10.0.2.{i}" for i in range(4)])
            with pytest.raises(DatapathError, match="holds 8 prefixes and is full"):
                dp.provision(2, [f"10.0.2.{i}" for i in range(5)])
            assert sorted(dp.prefixes()[2]) == [f"10.0.2.{i}/32" for i in range(4)]
            with pytest.raises(
                ValidationError, match=r"prefix 10\.0\.1\.2/32 already belongs to slot 1"
            ):
                dp.provision(2, ["10.0.1.2"])
            # A different capacity over the same pins is refused, not silently mixed.
            with pytest.raises(DatapathError, match="hold 2 subscribers, not 4"):
                Datapath(dev, dp.gateway_id, capacity=4).attach()
        finally:
            dp.detach()
    assert nothing_attached(netns, dev, dp)


def test_a_changed_prefix_list_withdraws_the_old_prefixes(netns_pair: tuple[str, str]) -> None:
    netns, dev = netns_pair
    with in_netns(netns):
        dp = Datapath(dev, f"err{os.getpid()}", capacity=4)
        dp.attach()
        try:
            dp.provision(1, ["10.0.0.1", "2001:db8::1"])
            dp.provision(1, ["10.0.0.2"])
            dp.provision(2, ["10.0.0.1"])  # free again
            assert dp.prefixes() == {1: ["10.0.0.2/32"], 2: ["10.0.0.1/32"]}
            # Two slots swap a prefix in one call; listing one prefix for two slots is refused.
            dp.provision_many(
                [Provision(1, ("10.0.0.1",)), Provision(2, ("10.0.0.2", "10.0.3.0/24"))]
            )
            assert dp.prefixes() == {1: ["10.0.0.1/32"], 2: ["10.0.0.2/32", "10.0.3.0/24"]}
            with pytest.raises(ValidationError, match="listed for slots 3 and 4"):
                dp.provision_many([Provision(3, ("10.0.9.9",)), Provision(4, ("10.0.9.9",))])
            assert 3 not in dp.prefixes() and 4 not in dp.prefixes()
        finally:
            dp.detach()
