"""When a changed subscribers file may be applied: only once it is complete and settled.

Editors and scp write the file in place, so a reload can read it half
written, and a half-written CSV often still parses (`50GB` cut to `5` is a
valid quota). The rule, checked before a reload reads a single subscriber:

1. the file ends with a newline (a cut inside the last line is refused:
   `registry.parse_subscribers_file`), and
2. its inode, size, mtime (ns) and content hash stayed the same over the
   settle period (`[subscribers] settle`, 2 s by default), measured on the
   service's monotonic clock, so a writer that is still writing is waited for.

A writer that stopped for good exactly at a line end passes both: that is
what the grace period of removed subscribers is for (`registry.SlotTable`).
docs/configuration.md tells operators to write the file atomically (a
temporary file renamed over the old one), which no reader can see half done.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from desanet.errors import ConfigError

Stamp = tuple[int, int, int]  # inode, size, mtime_ns


@dataclass(frozen=True)
class _Observation:
    stamp: Stamp | None  # None: the file is missing or unreadable
    digest: bytes | None
    since_s: float  # monotonic time this (stamp, digest) was first seen


def _stamp(path: Path) -> Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _digest(data: bytes | None) -> bytes | None:
    return None if data is None else hashlib.sha256(data).digest()


class SettledFile:
    """Watches the subscribers file and hands out its content once it has settled.

    `poll` costs one stat while nothing changes. `force()` (SIGHUP) asks for
    the content even if it did not change since it was last handed out; it is
    still handed out only once settled.
    """

    def __init__(self, path: Path, settle_s: float) -> None:
        self.path = path
        self.settle_s = settle_s
        self._seen: _Observation | None = None
        self._taken: tuple[Stamp | None, bytes | None] | None = None
        self._forced = False

    def read_now(self) -> bytes:
        """The file as it is now (at start), remembered as handed out; raises ConfigError."""
        stamp, data = _stamp(self.path), _read(self.path)
        if data is None:
            raise ConfigError(f"{self.path}: cannot read the subscribers file")
        self._seen = _Observation(stamp, _digest(data), float("-inf"))
        self._taken = (stamp, self._seen.digest)
        return data

    def force(self) -> None:
        """Hand out the content at the next settled poll, changed or not."""
        self._forced = True

    def poll(self, now_s: float) -> bytes | None:
        """The content to apply now, or None (unchanged, or not settled yet).

        Raises ConfigError when the settled file cannot be read (it is gone).
        """
        stamp = _stamp(self.path)
        seen = self._seen
        if seen is None or stamp != seen.stamp:
            self._seen = _Observation(stamp, _digest(_read(self.path)), now_s)
            return None
        if not self._forced and (seen.stamp, seen.digest) == self._taken:
            return None
        if now_s - seen.since_s < self.settle_s:
            return None
        data = _read(self.path)
        digest, stamp = _digest(data), _stamp(self.path)
        if (stamp, digest) != (seen.stamp, seen.digest):
            self._seen = _Observation(stamp, digest, now_s)
            return None
        self._taken, self._forced = (stamp, digest), False
        if data is None:
            raise ConfigError(f"{self.path}: the subscribers file is missing or not readable")
        return data
