"""Compile one of desanet's BPF C files with BCC, against the running kernel's headers.

Only the process that attaches the datapath compiles; BCC is imported here, in
the function, so that a process that only reads or provisions pinned maps
never loads it.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from desanet.errors import DatapathError

EBPF_DIR = Path(__file__).parent


def compile_source(source: Path, defines: Mapping[str, str | int], what: str) -> Any:
    """A BCC module of `source`, with `defines` as -D flags; `what` names it in errors."""
    from bcc import BPF

    headers = Path("/lib/modules") / platform.release() / "build"
    if not (headers / "include").exists():
        raise DatapathError(
            f"BCC needs kernel headers at {headers} and finds none: run `sudo make setup`"
        )
    cflags = [f"-I{EBPF_DIR}", "-Wno-macro-redefined"]
    cflags += [f"-D{name}={value}" for name, value in defines.items()]
    try:
        return BPF(src_file=str(source).encode(), cflags=cflags)
    except Exception as err:  # BCC raises bare Exception on compile and load errors
        raise DatapathError(f"{what} did not compile or load: {err}") from err
