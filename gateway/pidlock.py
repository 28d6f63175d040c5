"""One service per state directory: an flock held on `desanet.pid` for the life of the process.

The kernel releases the lock when the process ends, however it ends (kill -9
included), so a stale file never blocks a restart and a reused pid is never
mistaken for the service. The file also holds the pid, for `desanet stop`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from desanet.errors import DesanetError

LOCK_FILE = "desanet.pid"
# `running_pid` takes a shared lock for an instant to probe: a start that meets it retries.
_ACQUIRE_TRIES = 10
_ACQUIRE_PAUSE_S = 0.05


class StateLock:
    """The exclusive lock of one state directory, held until `release()` or the process ends."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock and write our pid; raises DesanetError naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            for attempt in range(_ACQUIRE_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == _ACQUIRE_TRIES - 1:
                        other = _pid_in(fd)
                        who = f"pid {other}" if other is not None else "another process"
                        raise DesanetError(
                            f"another `desanet run` ({who}) uses {self.path.parent}; stop it first"
                        ) from None
                    time.sleep(_ACQUIRE_PAUSE_S)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Let another service take the directory (the file stays: unlinking it would race)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def running_pid(state_dir: Path) -> int | None:
    """The pid of the service holding `state_dir`, or None when no service holds it."""
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_in(fd: int) -> int | None:
    with contextlib.suppress(ValueError, OSError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
