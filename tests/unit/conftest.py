"""Fixtures of the service-loop tests: a lab (kernel parts faked) and a service running in it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from desanet.gateway.service import GatewayService
from tests.unit.service_lab import S1, S2, S3, Lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    yield Lab(tmp_path)


@pytest.fixture
def running(lab: Lab) -> Iterator[GatewayService]:
    lab.write(S1, S2, S3)
    service = lab.service()
    service.start()
    try:
        yield service
    finally:
        service.close()
