# Over 400 lines: loading, appending, reading, rewriting and retention all keep the same segment
# index under one lock.
"""The durable, append-only journal of usage messages, one epoch per journal.

Every message is written here, and fsync'd, before it is published. A record
also carries the aggregator state change that produced it, so the message and
the state it leaves behind are committed by one write.

On disk: `<dir>/<first seq, 20 digits>.seg` files, each a segment header
naming the stream epoch (meter.epoch), then crc-checked records; the format
is meter.records. Seqs are consecutive across segments. A segment without a
header (it starts with a record) was written before epochs existed: its epoch
is unknown (None).

Damage is told apart from a torn write. A **torn tail** is damage in the last
segment that reaches the end of the file with no valid record anywhere after
it: what kill -9 or a power cut leaves of a record being written. Anything
else (damage in an older segment, or damage followed by a valid record) is
refused with the file and byte offset, and nothing is cut. Loading never
changes a file: `torn_tail` says what a `repair()` would cut, and the caller
(which knows which seqs were published) decides.

Retention removes whole segments, oldest first, once a checkpoint covers them
and the journal is over its size limit or the segment is older than the age limit.
A consumer that must see every record (the fleet forwarder) `hold()`s the journal
at the last seq it has delivered: newer segments are kept past both limits, up to
HOLD_HARD_FACTOR times the size limit, where the disk comes first. Compaction
(meter.compact) replaces a sealed segment, one record per seq as before, with
`rewrite_segment`.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from desanet.durable import PRIVATE, fsync_dir
from desanet.errors import StreamError
from desanet.meter.records import (
    HEADER,
    encode_record,
    encode_segment_header,
    next_valid_record,
    scan_records,
    segment_header,
    split_payload,
)

log = logging.getLogger(__name__)

SUFFIX = ".seg"
# A held journal may grow to this many times its size limit before it drops undelivered records.
HOLD_HARD_FACTOR = 2


@dataclass(frozen=True)
class Retention:
    """How much journal to keep: segments go when over `max_bytes` or older than `max_age_s`."""

    max_bytes: int = 1 << 30
    max_age_s: float = 31 * 86400.0
    segment_bytes: int = 16 << 20


@dataclass(frozen=True)
class TornTail:
    """The bytes a `repair()` cuts: from `offset` to the end of the last segment `path`."""

    path: Path
    offset: int
    size: int


@dataclass
class _Segment:
    first_seq: int
    path: Path
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    size: int = 0

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.offsets) - 1


def _refuse(path: Path, offset: int, detail: str) -> StreamError:
    return StreamError(
        f"journal {path} is damaged at byte {offset} ({detail}); nothing was cut. Restore the "
        "file from a backup, or move the journal directory aside: the service then starts a "
        "new stream epoch"
    )


class Journal:
    """Segmented, fsync'd journal of (seq, message, state change) records of one epoch.

    `epoch` names the epoch of new segments; a directory that already holds
    segments keeps theirs (a different `epoch` is refused).
    """

    def __init__(
        self, directory: Path, retention: Retention | None = None, epoch: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.retention = retention or Retention()
        self.epoch = epoch
        self.torn_tail: TornTail | None = None
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._hold: Callable[[], int] | None = None
        # The oldest checkpoint's seq at the last prune: records up to it are never replayed.
        self.checkpoint_seq = 0
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StreamError(f"cannot create journal directory {self.directory}: {err}") from err
        self._load(epoch)

    @classmethod
    def create(cls, directory: Path, epoch: str, retention: Retention | None = None) -> Journal:
        """A new, empty journal of `epoch`: its first segment (header only) is written now."""
        journal = cls(directory, retention, epoch)
        if journal._segments:
            raise StreamError(f"journal {directory} is not empty: a new epoch needs a new journal")
        with journal._lock:
            journal._roll(1)
        return journal

    @property
    def first_seq(self) -> int:
        """Oldest seq still retained, or 0 when the journal holds no record."""
        with self._lock:
            return next((s.first_seq for s in self._segments if s.offsets), 0)

    @property
    def last_seq(self) -> int:
        """Newest seq written, or 0 when the journal holds no record."""
        with self._lock:
            return self._last_seq()

    def _last_seq(self) -> int:
        return max(0, self._segments[-1].last_seq) if self._segments else 0

    def _load(self, epoch: str | None) -> None:
        paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        expected = 0
        for index, path in enumerate(paths):
            last = index == len(paths) - 1
            try:
                data = path.read_bytes()
            except OSError as err:
                raise StreamError(f"cannot read journal segment {path}: {err}") from err
            header = segment_header(data)
            start, seg_epoch = header if header is not None else (0, None)
            seg = _Segment(first_seq=_name_seq(path), path=path, size=start)
            if header is not None:
                for offset, seq, payload in scan_records(data, start):
                    if not seg.offsets:
                        seg.first_seq = seq
                    if expected and seq != expected:
                        where = f"{path} at byte {offset}"
                        if not seg.offsets and self._segments:
                            where = f"the end of {self._segments[-1].path} (cut short?)"
                        raise StreamError(
                            f"journal {path} holds seq {seq} where {expected} was expected: "
                            f"seqs {expected}..{seq - 1} are missing at {where}. Restore the "
                            "journal from a backup, or move the journal directory aside: the "
                            "service then starts a new stream epoch"
                        )
                    seg.offsets.append(offset)
                    expected = seq + 1
                    seg.size = offset + HEADER.size + len(payload)
            if header is None or seg.size < len(data):
                self._damage(path, data, seg.size, last, header is None)
                if header is None:
                    continue  # a torn header: the whole (last) file is the torn tail
            self._check_epoch(path, seg_epoch, not self._segments, epoch)
            if seg.offsets and seg.first_seq != _name_seq(path):
                raise StreamError(
                    f"journal {path} starts at seq {seg.first_seq}, its name says "
                    f"{_name_seq(path)}: the journal was edited; move the journal directory aside"
                )
            if not seg.offsets and not last:
                raise _refuse(path, seg.size, "it holds no record, and newer segments follow")
            if not seg.offsets and expected:
                seg.first_seq = expected
            self._segments.append(seg)

    def _check_epoch(self, path: Path, found: str | None, first: bool, wanted: str | None) -> None:
        if first:
            if wanted is not None and found != wanted:
                raise StreamError(
                    f"journal {self.directory} belongs to epoch {found!r}, not {wanted!r}"
                )
            self.epoch = found
        elif found != self.epoch:
            raise StreamError(
                f"journal {path} is of epoch {found!r}, the segments before it of "
                f"{self.epoch!r}: segments of two journals were mixed; move the directory aside"
            )

    def _damage(self, path: Path, data: bytes, end: int, last: bool, bad_header: bool) -> None:
        """Refuse damage, or note it as the torn tail (see the module docstring)."""
        following = next_valid_record(data, end + 1 if not bad_header else 0)
        if bad_header and following is None and not last:
            raise _refuse(path, 0, "its segment header is not valid")
        if following is not None:
            offset, seq = following
            what = "segment header" if bad_header else "record"
            raise _refuse(
                path,
                end,
                f"a {what} fails its check, and a valid record (seq {seq}) follows at byte "
                f"{offset}",
            )
        if not last:
            raise _refuse(path, end, "not the tail: newer segments follow")
        self.torn_tail = TornTail(path, end, len(data) - end)

    def repair(self) -> None:
        """Cut the torn tail found at load (the caller knows none of it was published)."""
        torn = self.torn_tail
        if torn is None:
            return
        log.warning(
            "journal %s: cutting a torn last record (%d bytes from byte %d)",
            torn.path,
            torn.size,
            torn.offset,
        )
        try:
            if torn.offset == 0:
                torn.path.unlink()
            else:
                with open(torn.path, "r+b") as f:
                    f.truncate(torn.offset)
                    os.fsync(f.fileno())
            fsync_dir(self.directory)
        except OSError as err:
            raise StreamError(f"cannot cut the torn tail of {torn.path}: {err}") from err
        self.torn_tail = None

    def records_after(self, seq: int) -> Iterator[tuple[int, bytes, bytes]]:
        """(seq, message, state change) of every record newer than `seq`, oldest first."""
        with self._lock:
            segments = [s for s in self._segments if s.offsets and s.last_seq > seq]
        for seg in segments:
            data = seg.path.read_bytes()[: seg.size]
            for _offset, rec_seq, payload in scan_records(data, seg.offsets[0]):
                if rec_seq > seq:
                    message, state = split_payload(payload)
                    yield rec_seq, message, state

    def append(self, seq: int, message: bytes, state: bytes) -> None:
        """Write one record and fsync it; `seq` must follow the last one."""
        if self.epoch is None:
            raise StreamError(f"journal {self.directory} has no epoch: it cannot be appended to")
        if self.torn_tail is not None:
            raise StreamError(f"journal {self.directory} has a torn tail: repair() it first")
        record = encode_record(seq, message, state)
        with self._lock:
            last = self._last_seq()
            if last and seq != last + 1:
                raise StreamError(f"journal append of seq {seq} after {last}: seqs must be +1")
            active = self._segments[-1] if self._segments else None
            if active is None or (
                active.offsets and active.size + len(record) > self.retention.segment_bytes
            ):
                active = self._roll(seq)
            fd = self._fd if self._fd is not None else self._open(active)
            try:
                os.pwrite(fd, record, active.size)
                os.fdatasync(fd)
            except OSError as err:
                # Leave no half record behind for the next append to follow.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, active.size)
                raise StreamError(f"cannot write the journal {active.path}: {err}") from err
            if not active.offsets:
                active.first_seq = seq
            active.offsets.append(active.size)
            active.size += len(record)

    def _roll(self, seq: int) -> _Segment:
        if self.epoch is None:
            raise StreamError(f"journal {self.directory} has no epoch for a new segment")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        seg = _Segment(first_seq=seq, path=self.directory / f"{seq:020d}{SUFFIX}")
        header = encode_segment_header(self.epoch)
        fd = self._open(seg)
        try:
            os.pwrite(fd, header, 0)
            os.fdatasync(fd)
        except OSError as err:
            raise StreamError(f"cannot write journal segment {seg.path}: {err}") from err
        seg.size = len(header)
        self._segments.append(seg)
        return seg

    def _open(self, seg: _Segment) -> int:
        try:
            self._fd = os.open(seg.path, os.O_RDWR | os.O_CREAT, PRIVATE)
            fsync_dir(self.directory)
        except OSError as err:
            raise StreamError(f"cannot open journal segment {seg.path}: {err}") from err
        return self._fd

    @property
    def size_bytes(self) -> int:
        """Bytes the journal's segments hold now (retention keeps it under its max_bytes)."""
        return sum(seg.size for seg in self._segments)

    def read(self, seq: int, limit: int, max_bytes: int = 8 << 20) -> list[tuple[int, bytes]]:
        """Up to `limit` (seq, message) pairs from `seq` on, as they were published.

        At most about `max_bytes` of records are read (always at least one), so a
        replay request never holds the journal for long; each record's crc is checked.
        """
        with self._lock:
            segments = [s for s in self._segments if s.offsets]
            firsts = [s.first_seq for s in segments]
            index = max(0, bisect.bisect_right(firsts, seq) - 1)
            out: list[tuple[int, bytes]] = []
            budget = max_bytes
            while index < len(segments) and len(out) < limit and budget > 0:
                seg = segments[index]
                start = max(seq, seg.first_seq) - seg.first_seq
                stop_max = min(len(seg.offsets), start + limit - len(out))
                if start >= stop_max:
                    index += 1
                    continue
                lo = seg.offsets[start]
                stop = start + 1
                while stop < stop_max and self._end(seg, stop) - lo <= budget:
                    stop += 1
                hi = self._end(seg, stop - 1)
                with open(seg.path, "rb") as f:
                    f.seek(lo)
                    data = f.read(hi - lo)
                records = list(scan_records(data))
                if len(records) != stop - start:
                    raise StreamError(
                        f"journal {seg.path} no longer reads back at byte {lo}: "
                        "the disk or the file is damaged"
                    )
                out.extend((rec_seq, split_payload(p)[0]) for _o, rec_seq, p in records)
                budget -= hi - lo
                if stop < stop_max:
                    break  # the byte budget ended inside this segment
                index += 1
            return out

    @staticmethod
    def _end(seg: _Segment, i: int) -> int:
        return seg.offsets[i + 1] if i + 1 < len(seg.offsets) else seg.size

    def hold(self, delivered_seq: Callable[[], int]) -> None:
        """Keep every record newer than `delivered_seq()` (see the module doc)."""
        self._hold = delivered_seq

    def sealed_segments(self) -> list[tuple[int, int]]:
        """(first seq, last seq) of every segment but the one being appended to, oldest first."""
        with self._lock:
            return [(s.first_seq, s.last_seq) for s in self._segments[:-1] if s.offsets]

    def rewrite_segment(self, first_seq: int, records: Sequence[tuple[int, bytes, bytes]]) -> int:
        """Replace sealed segment `first_seq` by `records`, the same seqs; returns bytes saved.

        Written beside it (without the lock: appends and reads go on) and renamed over it
        (fsync'd both), keeping its mtime, which the age limit reads: a crash leaves
        either the old segment or the new one. A segment retention removed meanwhile
        stays removed (0 saved).
        """
        with self._lock:
            seg = next((s for s in self._segments[:-1] if s.first_seq == first_seq), None)
            seqs = [r[0] for r in records]
            expected = [] if seg is None else list(range(first_seq, seg.last_seq + 1))
            if seg is None or self.epoch is None or seqs != expected:
                raise StreamError(
                    f"journal {self.directory}: segment {first_seq} is not sealed, or the "
                    "rewrite does not hold exactly its seqs; nothing was changed"
                )
            header = encode_segment_header(self.epoch)
        chunks, offsets, size = [header], array("Q"), len(header)
        for seq, message, state in records:
            record = encode_record(seq, message, state)
            offsets.append(size)
            chunks.append(record)
            size += len(record)
        tmp = seg.path.with_name(seg.path.name + ".new")
        try:
            with open(tmp, "wb", opener=lambda p, f: os.open(p, f, PRIVATE)) as out:
                out.write(b"".join(chunks))
                out.flush()
                os.fsync(out.fileno())
            with self._lock:
                if not any(s is seg for s in self._segments[:-1]):
                    tmp.unlink()
                    return 0
                stat = seg.path.stat()
                os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
                os.replace(tmp, seg.path)
                fsync_dir(self.directory)
                saved = seg.size - size
                seg.offsets, seg.size = offsets, size
                return saved
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StreamError(f"cannot rewrite journal segment {seg.path}: {err}") from err

    def prune(self, checkpoint_seq: int) -> list[Path]:
        """Delete the oldest segments beyond retention that `checkpoint_seq` covers."""
        removed: list[Path] = []
        now = time.time()
        self.checkpoint_seq = checkpoint_seq
        held = self._hold() if self._hold is not None else None
        with self._lock:
            while len(self._segments) > 1:
                oldest = self._segments[0]
                total = sum(s.size for s in self._segments)
                try:
                    age = now - oldest.path.stat().st_mtime
                except OSError:
                    age = 0.0
                over = total > self.retention.max_bytes or age > self.retention.max_age_s
                if not over or oldest.last_seq > checkpoint_seq:
                    break
                if held is not None and oldest.last_seq > held:
                    if total <= HOLD_HARD_FACTOR * self.retention.max_bytes:
                        break
                    log.error(
                        "journal: %d bytes, %dx its limit: dropping seqs %d-%d not yet delivered",
                        total,
                        HOLD_HARD_FACTOR,
                        max(oldest.first_seq, held + 1),
                        oldest.last_seq,
                    )
                oldest.path.unlink(missing_ok=True)
                removed.append(oldest.path)
                self._segments.pop(0)
        for path in removed:
            log.info("journal: removed %s (retention)", path.name)
        return removed

    def close(self) -> None:
        """Close the active segment."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _name_seq(path: Path) -> int:
    stem = path.name[: -len(SUFFIX)]
    return int(stem) if stem.isdigit() else 0
