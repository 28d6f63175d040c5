"""Every file the service keeps holds usage: nobody else may read it, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.unit.service_lab import S1, S2, Lab

pytestmark = pytest.mark.unit


def test_state_files_are_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        lab = Lab(tmp_path)
        lab.write(S1, S2)
        service = lab.service()
        service.start()
        try:
            lab.datapath.send("10.0.0.1", up=100, down=1_000)
            lab.tick(service)
            assert service.handle_requests([{"op": "suspend", "sub": "s2"}])[0]["ok"] is True
            lab.tick(service)
            state = tmp_path / "state"
            found = {p.relative_to(state): stat.S_IMODE(p.stat().st_mode) for p in state.rglob("*")}
        finally:
            service.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert Path("control.sqlite") in found and Path("slots.json") in found
    assert any(p.suffix == ".seg" for p in found), found
    wide = {
        str(p): oct(mode)
        for p, mode in found.items()
        if mode & 0o007 or (mode & 0o070 and p.name != "status.json")
    }
    assert wide == {}, wide
