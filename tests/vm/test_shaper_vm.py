"""The shaper on the stock kernel: fq_codel and cake leaves are applied and read back as planned."""

from __future__ import annotations

import json

import pytest

from desanet.gateway.lab import Village, in_netns, run
from desanet.shaper.plan import classids_for_slot
from tests.vm.satlink import GEO, Gateway

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("leaf", ["fq_codel", "cake"])
def test_leaves_are_applied_and_read_back(sat_gateway: tuple[Village, Gateway], leaf: str) -> None:
    v, gw = sat_gateway
    plan = gw.plan(GEO, leaf, GEO.rtt_ms)
    result = gw.apply(plan)
    assert result.leaf_in_use == leaf
    assert result.warnings == []

    with in_netns(v.gw_ns):
        actual = gw.shaper.read_back()
    # Every planned leaf is read back with its kind and options: the read-back
    # understands this kind as the stock kernel reports it.
    for direction in ("down", "up"):
        wanted = result.plan.tree(direction).leaves
        got = actual[direction].leaves
        assert set(got) == set(wanted)
        assert [cid for cid in wanted if not wanted[cid].satisfied_by(got[cid])] == []
        assert {q.kind for q in got.values()} == {leaf}

    # Witness: tc sees a leaf of this kind under every subscriber's download class.
    shown = json.loads(run(["tc", "-j", "qdisc", "show", "dev", v.lan], v.gw_ns))
    kinds = {q["parent"]: q["kind"] for q in shown if "parent" in q}
    for sub in v.subscribers:
        down, _ = classids_for_slot(sub.index)
        assert kinds[f"{down >> 16:x}:{down & 0xFFFF:x}"] == leaf
