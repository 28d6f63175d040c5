"""The on-disk record format of the meter: journal segments, checkpoints, the published mark.

    segment header  "DNJS" | u16 epoch length | epoch (ASCII) | u32 crc32(bytes before it)
    record          "DNJ1" | u32 payload length | u64 seq | u32 crc32(length, seq, payload)
                    | payload
    payload         u32 message length | message | state change

all little-endian. A journal segment is a header then records; a checkpoint
and the published mark are each exactly one record (`single_record`).
Decoding never raises on damaged bytes: it reports where valid data ends.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from desanet.errors import StreamError

MAGIC = b"DNJ1"
HEADER = struct.Struct("<4sIQI")
SEGMENT_MAGIC = b"DNJS"
_SEGMENT_FIXED = struct.Struct("<4sH")
_CRC = struct.Struct("<I")
_CRC_FIELDS = struct.Struct("<IQ")
_MSG_LEN = struct.Struct("<I")
MAX_RECORD_BYTES = 1 << 30
MAX_EPOCH_BYTES = 64


def _crc(length: int, seq: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_FIELDS.pack(length, seq)))


def encode_record(seq: int, message: bytes, state: bytes) -> bytes:
    """One journal record (header and payload) for `seq`."""
    payload = b"".join((_MSG_LEN.pack(len(message)), message, state))
    return HEADER.pack(MAGIC, len(payload), seq, _crc(len(payload), seq, payload)) + payload


def encode_segment_header(epoch: str) -> bytes:
    """The header that opens every segment of `epoch`."""
    raw = epoch.encode("ascii")
    if not 0 < len(raw) <= MAX_EPOCH_BYTES:
        raise StreamError(f"epoch {epoch!r}: 1 to {MAX_EPOCH_BYTES} ASCII characters")
    fixed = _SEGMENT_FIXED.pack(SEGMENT_MAGIC, len(raw)) + raw
    return fixed + _CRC.pack(zlib.crc32(fixed))


def segment_header(data: bytes) -> tuple[int, str | None] | None:
    """(records start, epoch) of a segment: (0, None) without a header, None if it is damaged."""
    if data[: len(MAGIC)] == MAGIC:
        return 0, None
    if len(data) < _SEGMENT_FIXED.size:
        return None
    magic, length = _SEGMENT_FIXED.unpack_from(data)
    end = _SEGMENT_FIXED.size + length
    if magic != SEGMENT_MAGIC or not 0 < length <= MAX_EPOCH_BYTES or end + _CRC.size > len(data):
        return None
    (crc,) = _CRC.unpack_from(data, end)
    if crc != zlib.crc32(data[:end]):
        return None
    try:
        epoch = data[_SEGMENT_FIXED.size : end].decode("ascii")
    except UnicodeDecodeError:
        return None
    return end + _CRC.size, epoch


def split_payload(payload: bytes | memoryview) -> tuple[bytes, bytes]:
    """(message, state change) of a record payload; StreamError if it does not hold them."""
    if len(payload) < _MSG_LEN.size:
        raise StreamError("journal record too short for its message length")
    (msg_len,) = _MSG_LEN.unpack_from(payload)
    end = _MSG_LEN.size + msg_len
    if end > len(payload):
        raise StreamError("journal record shorter than the message it announces")
    return bytes(payload[_MSG_LEN.size : end]), bytes(payload[end:])


def _record_at(data: bytes, pos: int) -> tuple[int, memoryview] | None:
    """(seq, payload) of a valid record starting at `pos`, else None."""
    if pos + HEADER.size > len(data):
        return None
    magic, length, seq, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or length > MAX_RECORD_BYTES or end > len(data):
        return None
    payload = memoryview(data)[pos + HEADER.size : end]
    return (seq, payload) if _crc(length, seq, payload) == crc else None


def scan_records(data: bytes, start: int = 0) -> Iterator[tuple[int, int, memoryview]]:
    """(offset, seq, payload) of each valid record from `start`; stops at the first invalid byte."""
    pos = start
    while (found := _record_at(data, pos)) is not None:
        seq, payload = found
        yield pos, seq, payload
        pos += HEADER.size + len(payload)


def single_record(data: bytes) -> tuple[int, bytes] | None:
    """(seq, message) when `data` is exactly one valid record (a small durable file), else None."""
    found = _record_at(data, 0)
    if found is None or HEADER.size + len(found[1]) != len(data):
        return None
    try:
        return found[0], split_payload(found[1])[0]
    except StreamError:
        return None


def next_valid_record(data: bytes, start: int) -> tuple[int, int] | None:
    """(offset, seq) of the first valid record starting at or after `start`, if any."""
    pos = data.find(MAGIC, start)
    while pos >= 0:
        found = _record_at(data, pos)
        if found is not None:
            return pos, found[0]
        pos = data.find(MAGIC, pos + 1)
    return None
