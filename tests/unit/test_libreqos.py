"""`desanet import libreqos`: ShapedDevices.csv in LibreQoS's published format to subscribers.csv.

The written file must load through the gateway's own subscriber registry:
that is what the operator runs next.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from desanet.gateway.cli import main
from desanet.gateway.config import LinkConfig
from desanet.gateway.registry import load_subscribers

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "libreqos"
HEADER = (
    "Circuit ID,Circuit Name,Device ID,Device Name,Parent Node,MAC,IPv4,IPv6,"
    "Download Min Mbps,Upload Min Mbps,Download Max Mbps,Upload Max Mbps,Comment"
)


def link() -> LinkConfig:
    return LinkConfig(down_bps=50_000_000, up_bps=10_000_000)


def test_import_merges_devices_per_circuit_and_loads_as_subscribers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "subscribers.csv"
    args = ["import", "libreqos", str(DATA / "ShapedDevices.csv"), "-o", str(out)]
    assert main([*args, "--network", str(DATA / "network.json")]) == 0
    printed = capsys.readouterr().out
    assert "3 subscribers" in printed
    assert "2 MAC addresses left out" in printed
    subs = {s.id: s for s in load_subscribers(out, link(), capacity=16)}
    assert list(subs) == ["1", "2", "school-01"]
    assert subs["1"].name == "Warung Bu Sri, RT 02"
    assert subs["1"].prefixes == ("100.64.0.1", "100.64.0.14", "100.64.0.15", "2001:db8:1::/64")
    plan = subs["1"].plan
    assert (plan.down_min_bps, plan.down_max_bps) == (2_500_000, 10_000_000)
    assert (plan.up_min_bps, plan.up_max_bps) == (500_000, 2_000_000)
    assert subs["2"].plan.down_max_bps == 5_500_000
    assert subs["2"].plan.up_min_bps == 250_000
    assert "mac" not in out.read_text().splitlines()[0]


def test_mac_column_only_behind_the_switch(tmp_path: Path) -> None:
    out = tmp_path / "subscribers.csv"
    assert (
        main(["import", "libreqos", str(DATA / "ShapedDevices.csv"), "-o", str(out), "--mac"]) == 0
    )
    lines = out.read_text().splitlines()
    assert lines[0].endswith(",quota,mac")
    assert lines[1].endswith(",aa:bb:cc:00:00:01 aa:bb:cc:00:00:02")


def test_every_problem_is_reported_with_its_line_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "ShapedDevices.csv"
    bad.write_text(
        "\n".join(
            [
                HEADER,
                "a,A,1,d1,AP_Utara,,100.64.0.1,,5,1,2,1,",  # line 2: download min > max
                "b,B,2,d2,AP_Utara,,100.64.0.1,,1,1,2,2,",  # line 3: same address as a
                "c,C,3,d3,AP_Utara,,,,1,1,2,2,",  # line 4: no address
                "d,D,4,d4,AP_Nowhere,,100.64.9.0/24,,1,1,2,2,",  # line 5: unknown parent
                "e,E,5,d5,AP_Utara,,100.64.8.1/24,,1,1,2,2,",  # line 6: host bits set
                "b,B,6,d6,AP_Utara,,100.64.7.1,,1,1,3,2,",  # line 7: rates differ from line 3
            ]
        )
        + "\n"
    )
    out = tmp_path / "subscribers.csv"
    out.write_text("the operator's old file\n")
    code = main(
        ["import", "libreqos", str(bad), "-o", str(out), "--network", str(DATA / "network.json")]
    )
    assert code == 2
    err = capsys.readouterr().err
    for expected in (
        f"{bad}:2: Download Min Mbps 5 is above Max 2",
        f"{bad}:3: circuit b: 100.64.0.1 overlaps 100.64.0.1 of circuit a (line 2)",
        f"{bad}:4: circuit c: no IPv4 or IPv6 address",
        f"{bad}:5: Parent Node 'AP_Nowhere' is not in network.json",
        f"{bad}:6: IPv4 '100.64.8.1/24'",
        f"{bad}:7: circuit b: rates differ from its device on line 3",
    ):
        assert expected in err
    assert out.read_text() == "the operator's old file\n"


def test_sqm_column_suggests_the_leaf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ShapedDevices.csv"
    src.write_text(
        HEADER.replace("Parent Node,", "Parent Node,Parent Node ID,Anchor Node ID,")
        + ",sqm\n"
        + "1,One,1,d,AP,,,,100.64.0.1,,1,1,2,2,,cake diffserv4\n"
        + "2,Two,2,d,AP,,,,100.64.0.2,,1.5,0.5,3,1,,cake\n"
    )
    out = tmp_path / "subscribers.csv"
    assert main(["import", "libreqos", str(src), "-o", str(out)]) == 0
    assert '[shaping] leaf = "cake"' in capsys.readouterr().out
    assert [s.id for s in load_subscribers(out, link(), 16)] == ["1", "2"]
