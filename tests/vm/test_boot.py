"""The VM is what the tier claims: a stock kernel with the qdiscs the development kernel lacks."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def test_runs_a_stock_kernel_with_fq_codel_cake_and_netem() -> None:
    modules = Path("/lib/modules") / platform.release()
    builtin = {Path(line).stem for line in (modules / "modules.builtin").read_text().split()}
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    assert {"sch_fq_codel", "sch_cake", "sch_netem", "sch_htb"} <= builtin | loaded
