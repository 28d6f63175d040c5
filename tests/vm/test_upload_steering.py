"""Upload steering on the stock kernel: the datapath redirects LAN ingress to the upload IFB,
whose HTB tree shapes it, and the packets go on to the internet.
"""

from __future__ import annotations

import json

import pytest

from desanet.gateway.lab import Village, in_netns, run
from tests.vm.satlink import LEO, Gateway, emulate, ping_rtts_ms

pytestmark = pytest.mark.vm


def test_upload_goes_through_the_ifb_tree_and_on(sat_gateway: tuple[Village, Gateway]) -> None:
    v, gw = sat_gateway
    emulate(v, LEO)
    gw.apply(gw.plan(LEO, "fq_codel", LEO.rtt_ms))
    sub = v.subscribers[2]
    with in_netns(v.gw_ns):
        before = gw.shaper.class_stats()["up"][sub.index].sent_packets
    rtts = ping_rtts_ms(v, sub, 2.0)
    with in_netns(v.gw_ns):
        after = gw.shaper.class_stats()["up"][sub.index].sent_packets
    stats = json.loads(run(["ip", "-s", "-j", "link", "show", gw.shaper.upload_ifb], v.gw_ns))
    ifb_rx_dropped = stats[0]["stats64"]["rx"]["dropped"]
    assert len(rtts) >= 8, f"pings through the upload IFB were lost ({ifb_rx_dropped=})"
    assert after - before >= len(rtts)
