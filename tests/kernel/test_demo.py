"""`desanet demo` end to end: the report's figures, its files, and nothing left behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from desanet.gateway.demo import run_demo

pytestmark = pytest.mark.kernel


def test_demo_report_meets_its_checks_and_cleans_up(tmp_path: Path) -> None:
    summary = run_demo(seconds=30, out_dir=tmp_path, print_=lambda *_: None)
    fairness = summary["fairness"]
    assert fairness["down_before"] >= 0.95 and fairness["down_after"] >= 0.95
    assert summary["jain"] >= 0.95
    assert summary["billing_error"] <= 0.001
    assert summary["throttled_at_s"] is not None and summary["throttled_at_s"] < 30
    # The suspended subscriber is walled, the throttled one held near its fair-use plan.
    after = summary["rates_after"]
    assert after["s6"][0] < 200_000
    assert after["s5"][0] < 1_100_000
    # Billing hears of both changes in the usage stream itself.
    kinds = {(sub, kind) for _, sub, kind, _ in summary["stream_events"]}
    assert ("s5", "throttled") in kinds
    assert ("s6", "suspend") in kinds
    report = (tmp_path / "report.md").read_text()
    assert "Jain" in report and "Quota throttle: observed" in report
    if summary["leaf_in_use"] != summary["leaf_wanted"]:
        assert f"this kernel lacks {summary['leaf_wanted']}" in report
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    # The latency plot is drawn from the link RTT status showed through the load: both
    # directions read most intervals, with percentiles that are real times (p50 <= p95).
    rtt = summary["passive_rtt_ms"]
    for direction in ("wan", "lan"):
        assert rtt[direction]["points"] >= 20, rtt
        assert 0 < rtt[direction]["p50_median"] <= rtt[direction]["p95_max"] < 1000, rtt
    record = json.loads((tmp_path / "summary.json").read_text())["record"]
    assert all(p50 <= p95 for s in record["latency"] for p50, p95 in s["link"].values())
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "![passive RTT over time](latency.png)" in report
    # The console was served on the demo village, and the report says where.
    assert summary["console"]["answered"], summary["console"]
    assert summary["console"]["url"] in report
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert summary["lab_tag"] not in namespaces
    assert not Path(f"/sys/fs/bpf/desanet/demo-{summary['lab_tag'].lower()}").exists()
    assert summary["ok"]
