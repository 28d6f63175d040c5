"""Durable file writes: a file is either its old content or its new content, never a mix.

One mechanism for every state file desanet keeps: write a temporary file in
the same directory, fsync it, rename it over the target, fsync the directory
(without the last step a crash can leave the old name pointing nowhere).
Files are created private to the service (0600) unless asked otherwise:
they hold every subscriber's usage.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from desanet.errors import DesanetError

PRIVATE = 0o600


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(
    path: Path, data: bytes | Iterable[bytes], mode: int = PRIVATE, sync: bool = True
) -> None:
    """Replace `path` with `data` (bytes, or chunks of it) in one step; with `sync`, durable
    when this returns.

    `sync=False` still never shows a half-written file to a reader (for files
    that are rewritten often and may be lost in a crash, like the status).
    Chunks spare the caller joining a large file in memory first.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise DesanetError(f"cannot write {path}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if isinstance(data, bytes):
                f.write(data)
            else:
                f.writelines(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


def create_private(path: Path, data: bytes) -> None:
    """Write a new secret file that never exists with wider permissions than 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(Path(path).parent)
