"""The Python mirror of the datapath ABI matches the C header, field by field.

A small C program, compiled here with the same header, prints every struct's
size and every field's offset; the ctypes structures must agree exactly.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import pytest

from desanet.ebpf import abi
from desanet.ebpf.bpf_syscall import SkBuff

pytestmark = pytest.mark.unit


def c_layout(
    tmp_path: Path, structs: dict[str, type[ctypes.Structure]], include: str
) -> dict[str, int]:
    lines = [include, "#include <stdio.h>", "#include <stddef.h>", "int main(void) {"]
    for c_name, mirror in structs.items():
        lines.append(f'printf("{c_name} size %zu\\n", sizeof(struct {c_name}));')
        for field, *_ in mirror._fields_:
            if field.startswith("_"):
                continue
            lines.append(f'printf("{c_name}.{field} %zu\\n", offsetof(struct {c_name}, {field}));')
    lines.append("return 0; }")
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    # Lines read "name size N" or "name.field N": the key is everything before the number.
    return {m[1]: int(m[2]) for m in re.finditer(r"^(.+) (\d+)$", out, re.M)}


def python_layout(structs: dict[str, type[ctypes.Structure]]) -> dict[str, int]:
    layout = {}
    for c_name, mirror in structs.items():
        layout[f"{c_name} size"] = ctypes.sizeof(mirror)
        for field, *_ in mirror._fields_:
            if not field.startswith("_"):
                layout[f"{c_name}.{field}"] = getattr(mirror, field).offset
    return layout


def test_abi_structs_match_the_header(tmp_path: Path) -> None:
    include = f'#include "{abi.HEADER}"'
    c = c_layout(tmp_path, abi.STRUCTS, include)
    py = python_layout(abi.STRUCTS)
    assert {k: c[k] for k in py} == py


def test_abi_constants_match_the_header() -> None:
    text = abi.HEADER.read_text()
    defines = dict(re.findall(r"#define (DESANET_\w+) (\S+)", text))
    assert int(defines["DESANET_SLOT_UNMATCHED"]) == abi.SLOT_UNMATCHED
    assert int(defines["DESANET_DEFAULT_CAPACITY"]) == abi.DEFAULT_CAPACITY
    assert int(defines["DESANET_PREFIXES_PER_SUBSCRIBER"]) == abi.PREFIXES_PER_SUBSCRIBER
    assert int(defines["DESANET_SLOT_BLOCKED"], 0) == abi.SLOT_BLOCKED
    assert int(defines["DESANET_SLOT_MAC_BOUND"], 0) == abi.SLOT_MAC_BOUND
    assert int(defines["DESANET_SETTING_BLOCK_UNPROVISIONED"], 0) == abi.SETTING_BLOCK_UNPROVISIONED
    assert int(defines["DESANET_MACS_PER_SUBSCRIBER"]) == abi.MACS_PER_SUBSCRIBER
    assert int(defines["DESANET_GATEWAY_ADDRS_MAX"]) == abi.GATEWAY_ADDRS_MAX
    assert int(defines["DESANET_DROP_REASONS"]) == abi.DROP_REASONS
    assert int(defines["DESANET_RTT_WAN"]) == abi.RTT_WAN
    assert int(defines["DESANET_RTT_LAN"]) == abi.RTT_LAN
    assert int(defines["DESANET_RTT_FLOWS"]) == abi.RTT_FLOWS
    assert 1 << int(defines["DESANET_RTT_FLOWS_LOG2"]) == abi.RTT_FLOWS
    assert int(defines["DESANET_RTT_SLOT_BUCKETS"]) == abi.RTT_SLOT_BUCKETS
    assert int(defines["DESANET_RTT_LINK_BUCKETS"]) == abi.RTT_LINK_BUCKETS
    # Drop reasons are mirrored by name: the same names, the same stable numbers.
    reasons = {
        name: int(value)
        for name, value in re.findall(r"#define DESANET_DROP_(\w+) (\d+)", text)
        if name != "REASONS"
    }
    assert reasons == {reason.name: reason.value for reason in abi.DropReason}
    for name in (abi.MAP_SUBSCRIBERS, abi.MAP_COUNTERS, abi.MAP_SLOTS, abi.MAP_SETTINGS):
        assert f'"{name}"' in text
    assert set(re.findall(r'#define DESANET_(?:MAP|PROG)_\w+ "(\w+)"', text)) == set(abi.PINNED)
    fields = re.search(r"struct desanet_counters \{(.*?)\};", text, re.S)
    assert fields is not None
    assert tuple(re.findall(r"__u64 (\w+);", fields.group(1))) == abi.COUNTER_FIELDS


def test_sk_buff_mirror_matches_uapi(tmp_path: Path) -> None:
    c = c_layout(tmp_path, {"__sk_buff": SkBuff}, "#include <linux/bpf.h>")
    py = python_layout({"__sk_buff": SkBuff})
    assert {k: c[k] for k in py} == py
