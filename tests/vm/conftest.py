"""The VM tier's tests run only inside the stock-kernel VM that `make test-vm` boots.

Collected anywhere else (a bare `pytest` on the development kernel, which lacks
fq_codel, cake and netem), they are skipped with the command that runs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from desanet.gateway.lab import Village, village
from tests.vm import satlink
from tests.vm.guest import IN_VM_ENV
from tests.vm.satlink import Gateway

# One idle subscriber and three that download.
N_SUBSCRIBERS = 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(IN_VM_ENV) == "1":
        return
    skip = pytest.mark.skip(reason="runs inside the stock-kernel VM: make test-vm")
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sat_gateway() -> Iterator[tuple[Village, Gateway]]:
    """One village and one gateway for the whole tier: under emulation the datapath's
    compile alone takes about a minute, so every test shares them.

    Subscriber 1 is the idle one of the bufferbloat runs.
    """
    with village(N_SUBSCRIBERS) as v:
        satlink.start_servers(v)
        gw = Gateway(v)
        gw.start()
        try:
            yield v, gw
        finally:
            gw.stop()
