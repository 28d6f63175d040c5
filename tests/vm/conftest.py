"""The VM tier's tests run only inside the stock-kernel VM that `make test-vm` boots.

Collected anywhere else (a bare `pytest` on the development kernel, which lacks
fq_codel, cake and netem), they are skipped with the command that runs them.
"""

from __future__ import annotations

import os

import pytest

from tests.vm.guest import IN_VM_ENV


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(IN_VM_ENV) == "1":
        return
    skip = pytest.mark.skip(reason="runs inside the stock-kernel VM: make test-vm")
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(skip)
