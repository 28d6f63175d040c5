"""bpf(2) is found by its number in each architecture's system call table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from desanet.ebpf import bpf_syscall
from desanet.errors import DatapathError

pytestmark = pytest.mark.unit

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.parametrize(
    ("machine", "number"),
    [
        ("x86_64", 321),
        ("aarch64", 280),
        ("riscv64", 280),
        ("armv7l", 386),
        ("armv8l", 386),
        ("armv6l", 386),
    ],
)
def test_each_supported_architecture_has_its_number(machine: str, number: int) -> None:
    assert bpf_syscall.sys_bpf_number(machine) == number


def test_an_unknown_architecture_is_named_in_the_error() -> None:
    with pytest.raises(DatapathError, match=r"'mips64'.*not supported"):
        bpf_syscall.sys_bpf_number("mips64")


@pytest.mark.skipif(not UNISTD_64.exists(), reason="x86_64 kernel headers not installed")
def test_x86_64_number_matches_the_installed_headers() -> None:
    found = re.search(r"#define __NR_bpf (\d+)", UNISTD_64.read_text())
    assert found is not None
    assert bpf_syscall.sys_bpf_number("x86_64") == int(found.group(1))


def test_the_generic_table_gives_arm64_and_riscv64_their_number() -> None:
    generic = Path("/usr/include/asm-generic/unistd.h")
    found = re.search(r"#define __NR_bpf (\d+)", generic.read_text())
    assert found is not None
    assert bpf_syscall.sys_bpf_number("aarch64") == int(found.group(1))
    assert bpf_syscall.sys_bpf_number("riscv64") == int(found.group(1))
