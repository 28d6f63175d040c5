"""A second process reaches an attached datapath through its pins alone: no BCC, no compiler.

The gateway service attaches the datapath; `desanet datapath counters`, the
meter and any operator tool open what it pinned. Each check runs in a fresh
Python process and asserts that BCC was never imported there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from desanet.ebpf import frames
from desanet.ebpf.bpf_syscall import prog_test_run
from desanet.ebpf.datapath import Datapath
from desanet.gateway.lab import in_netns

pytestmark = pytest.mark.kernel

SUB_V4, SUB_V6, NEW_V4 = "10.5.0.7", "2001:db8:5::7", "10.5.0.8"
INTERNET_V4, INTERNET_V6 = "198.51.100.1", "2001:db8:ff::1"


@pytest.fixture
def datapath(netns_pair: tuple[str, str]) -> Iterator[Datapath]:
    netns, dev = netns_pair
    with in_netns(netns):
        dp = Datapath(dev, f"pin{os.getpid()}", capacity=64)
        dp.attach()
        try:
            dp.provision(1, [SUB_V4, SUB_V6])
            yield dp
        finally:
            dp.detach()


def in_fresh_process(code: str, *args: str) -> Any:
    """Run `code` in a new interpreter; it prints one JSON document, returned decoded."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


READ_COUNTERS = """
import json, sys
from desanet.meter.poll import CounterReader
with CounterReader.for_datapath(sys.argv[1], sys.argv[2]) as reader:
    rows = reader.read()[:3].tolist()
print(json.dumps({"rows": rows, "bcc": "bcc" in sys.modules}))
"""

OPEN_AND_PROVISION = """
import json, sys
from desanet.ebpf.datapath import Datapath
dp = Datapath(sys.argv[2], sys.argv[1], capacity=64)
dp.open()
before = dp.prefixes()
dp.provision(2, [sys.argv[3]], down_classid=0x10012)
rows = dp.read_counters()[:3].tolist()
print(json.dumps({"before": before, "rows": rows, "bcc": "bcc" in sys.modules}))
"""


def test_another_process_reads_exact_sums_without_bcc(datapath: Datapath) -> None:
    up, up_bytes = frames.udp_frame(SUB_V4, INTERNET_V4, 1200)
    down, down_bytes = frames.udp_frame(INTERNET_V6, SUB_V6, 700)
    for _ in range(5):
        prog_test_run(datapath.program_fd("desanet_ingress"), up)
    for _ in range(3):
        prog_test_run(datapath.program_fd("desanet_egress"), down)
    seen = in_fresh_process(READ_COUNTERS, datapath.gateway_id, datapath.lan)
    assert seen["bcc"] is False
    assert seen["rows"][1] == [5 * up_bytes, 5, 3 * down_bytes, 3]
    assert seen["rows"][0] == [0, 0, 0, 0]
    assert seen["rows"][1] == datapath.read_counters()[1].tolist()


def test_open_reaches_the_attached_datapath_without_compiling(datapath: Datapath) -> None:
    up, up_bytes = frames.udp_frame(SUB_V4, INTERNET_V4, 400)
    prog_test_run(datapath.program_fd("desanet_ingress"), up)
    seen = in_fresh_process(OPEN_AND_PROVISION, datapath.gateway_id, datapath.lan, NEW_V4)
    assert seen["bcc"] is False
    assert {k: sorted(v) for k, v in seen["before"].items()} == {
        "1": sorted([f"{SUB_V4}/32", f"{SUB_V6}/128"])
    }
    assert seen["rows"][1] == [up_bytes, 1, 0, 0]
    # What the other process provisioned is what the attached program now does.
    down, down_bytes = frames.udp_frame(INTERNET_V4, NEW_V4, 900)
    result = prog_test_run(datapath.program_fd("desanet_egress"), down)
    assert result.skb.priority == 0x10012
    assert datapath.read_counters()[2].tolist() == [0, 0, down_bytes, 1]
