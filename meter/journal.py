"""The durable, append-only journal of usage messages, with a crc per record.

Every message is written here, and fsync'd, before it is published. A record
also carries the aggregator state change that produced it, so the message and
the state it leaves behind are committed by one write: after kill -9 or a power
cut, the journal ends at a record whose message and state both exist, or the
torn last record is detected by its length or crc and cut off.

On disk: `<dir>/<first seq, 20 digits>.seg` files of records

    magic "DNJ1" | u32 payload length | u64 seq | u32 crc32(length, seq, payload) | payload
    payload = u32 message length | message (the exact published bytes) | state change

all little-endian. Seqs are consecutive across segments. Retention removes
whole segments, oldest first, once a checkpoint covers them and the journal is
over its size limit or the segment is older than the age limit.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from desanet.durable import PRIVATE, fsync_dir
from desanet.errors import StreamError

log = logging.getLogger(__name__)

MAGIC = b"DNJ1"
HEADER = struct.Struct("<4sIQI")
_CRC_FIELDS = struct.Struct("<IQ")
_MSG_LEN = struct.Struct("<I")
SUFFIX = ".seg"
MAX_RECORD_BYTES = 1 << 30


@dataclass(frozen=True)
class Retention:
    """How much journal to keep: segments go when over `max_bytes` or older than `max_age_s`."""

    max_bytes: int = 1 << 30
    max_age_s: float = 31 * 86400.0
    segment_bytes: int = 16 << 20


@dataclass
class _Segment:
    first_seq: int
    path: Path
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    size: int = 0

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.offsets) - 1


def _crc(length: int, seq: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_FIELDS.pack(length, seq)))


def encode_record(seq: int, message: bytes, state: bytes) -> bytes:
    """One journal record (header and payload) for `seq`."""
    payload = b"".join((_MSG_LEN.pack(len(message)), message, state))
    return HEADER.pack(MAGIC, len(payload), seq, _crc(len(payload), seq, payload)) + payload


def split_payload(payload: bytes | memoryview) -> tuple[bytes, bytes]:
    (msg_len,) = _MSG_LEN.unpack_from(payload)
    end = _MSG_LEN.size + msg_len
    return bytes(payload[_MSG_LEN.size : end]), bytes(payload[end:])


def scan_records(data: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(offset, seq, payload) of each valid record; stops at the first invalid byte."""
    view = memoryview(data)
    pos = 0
    while pos + HEADER.size <= len(data):
        magic, length, seq, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if magic != MAGIC or length > MAX_RECORD_BYTES or end > len(data):
            return
        payload = view[pos + HEADER.size : end]
        if _crc(length, seq, payload) != crc:
            return
        yield pos, seq, payload
        pos = end


class Journal:
    """Segmented, fsync'd journal of (seq, message, state change) records."""

    def __init__(self, directory: Path, retention: Retention | None = None) -> None:
        self.directory = Path(directory)
        self.retention = retention or Retention()
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StreamError(f"cannot create journal directory {self.directory}: {err}") from err
        self._load()

    @property
    def first_seq(self) -> int:
        """Oldest seq still retained, or 0 when the journal is empty."""
        with self._lock:
            return self._segments[0].first_seq if self._segments else 0

    @property
    def last_seq(self) -> int:
        """Newest seq written, or 0 when the journal is empty."""
        with self._lock:
            return self._last_seq()

    def _last_seq(self) -> int:
        return self._segments[-1].last_seq if self._segments else 0

    def _load(self) -> None:
        paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        expected = 0
        for index, path in enumerate(paths):
            data = path.read_bytes()
            seg = _Segment(first_seq=0, path=path)
            end = 0
            for offset, seq, payload in scan_records(data):
                if not seg.offsets:
                    seg.first_seq = seq
                if expected and seq != expected:
                    raise StreamError(
                        f"journal {path} holds seq {seq} where {expected} was expected: "
                        "the journal was edited; move it aside to start a new one"
                    )
                seg.offsets.append(offset)
                expected = seq + 1
                end = offset + HEADER.size + len(payload)
            if end < len(data):
                if index != len(paths) - 1:
                    raise StreamError(
                        f"journal {path} is damaged at byte {end} (not its tail): "
                        "restore it from backup or move it aside"
                    )
                log.warning(
                    "journal %s: dropping a torn last record (%d bytes after byte %d)",
                    path,
                    len(data) - end,
                    end,
                )
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            seg.size = end
            if seg.offsets:
                self._segments.append(seg)
            else:
                path.unlink()

    def records_after(self, seq: int) -> Iterator[tuple[int, bytes, bytes]]:
        """(seq, message, state change) of every record newer than `seq`, oldest first."""
        with self._lock:
            segments = [s for s in self._segments if s.last_seq > seq]
        for seg in segments:
            for _offset, rec_seq, payload in scan_records(seg.path.read_bytes()[: seg.size]):
                if rec_seq > seq:
                    message, state = split_payload(payload)
                    yield rec_seq, message, state

    def append(self, seq: int, message: bytes, state: bytes) -> None:
        """Write one record and fsync it; `seq` must follow the last one."""
        record = encode_record(seq, message, state)
        with self._lock:
            last = self._last_seq()
            if last and seq != last + 1:
                raise StreamError(f"journal append of seq {seq} after {last}: seqs must be +1")
            active = self._segments[-1] if self._segments else None
            if active is None or active.size + len(record) > self.retention.segment_bytes:
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
            active.offsets.append(active.size)
            active.size += len(record)

    def _roll(self, seq: int) -> _Segment:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        seg = _Segment(first_seq=seq, path=self.directory / f"{seq:020d}{SUFFIX}")
        self._segments.append(seg)
        self._open(seg)
        return seg

    def _open(self, seg: _Segment) -> int:
        try:
            self._fd = os.open(seg.path, os.O_RDWR | os.O_CREAT, PRIVATE)
            fsync_dir(self.directory)
        except OSError as err:
            raise StreamError(f"cannot open journal segment {seg.path}: {err}") from err
        return self._fd

    def read(self, seq: int, limit: int, max_bytes: int = 8 << 20) -> list[tuple[int, bytes]]:
        """Up to `limit` (seq, message) pairs from `seq` on, as they were published.

        At most about `max_bytes` of records are read (always at least one), so a
        replay request never holds the journal for long; each record's crc is checked.
        """
        with self._lock:
            firsts = [s.first_seq for s in self._segments]
            index = max(0, bisect.bisect_right(firsts, seq) - 1)
            out: list[tuple[int, bytes]] = []
            budget = max_bytes
            while index < len(self._segments) and len(out) < limit and budget > 0:
                seg = self._segments[index]
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

    def prune(self, checkpoint_seq: int) -> list[Path]:
        """Delete the oldest segments beyond retention that `checkpoint_seq` covers."""
        removed: list[Path] = []
        now = time.time()
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
