"""Kernel tier: root, network namespaces, the host kernel. Not root is a failure, not a skip."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from desanet.gateway.lab import Village, run, village


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the kernel tier needs root: run `sudo make test`")


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    """A throwaway namespace holding a veth pair ("dp0" <-> "dp1") that carries no traffic of
    its own (IPv6 off, no addresses); returns (netns, "dp0")."""
    name = f"dnt{os.getpid() % 100000}x{id(object()) % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # A silent link: with IPv6 on, the kernel's own duplicate-address and router
        # solicitations cross the veth and land in the counters the tests assert exactly.
        ipv6_off = [f"net.ipv6.conf.{scope}.disable_ipv6=1" for scope in ("all", "default")]
        run(["sysctl", "-qw", *ipv6_off], name)
        subprocess.run(
            ["ip", "-n", name, "link", "add", "dp0", "type", "veth", "peer", "name", "dp1"],
            check=True,
        )
        subprocess.run(["ip", "-n", name, "link", "set", "dp0", "up"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "dp1", "up"], check=True)
        yield name, "dp0"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def village4() -> Iterator[Village]:
    """A lab village of four subscribers, offloads off, always removed afterwards."""
    with village(4) as lab:
        yield lab
