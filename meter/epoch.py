"""Stream epochs: the identity of one unbroken life of a gateway's journal.

An epoch id is 32 lowercase hex digits: 12 of the gateway's wall clock in Unix
milliseconds when the epoch began (for people reading logs), then 20 random
(80 bits from `secrets`). Two epochs are only ever compared for equality: a
gateway without a real-time clock may start an epoch with a wrong date, and
the random part alone keeps ids unique.

The published mark (`published.mark`) is the high-water mark of what left the
gateway: the epoch and the newest seq published in it. It is rewritten after
each journal append and before the message is sent, outside the journal, so
a journal that later lost records (a deleted segment, a damaged tail) is
caught at the next start instead of re-publishing a seq of the same epoch.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgpack

from desanet.durable import replace_atomically
from desanet.errors import DesanetError, StreamError
from desanet.meter.records import encode_record, single_record
from desanet.meter.state import DamagedStateFile

MARK_NAME = "published.mark"
EPOCH_RE = re.compile(r"^[0-9a-f]{32}$")


def new_epoch(now_ms: int) -> str:
    """A fresh epoch id for an epoch beginning at `now_ms` (Unix ms)."""
    return f"{now_ms % (1 << 48):012x}{secrets.token_hex(10)}"


@dataclass(frozen=True)
class PublishedMark:
    """The newest seq published in `epoch`."""

    epoch: str
    seq: int


def write_mark(directory: Path, gateway_id: str, mark: PublishedMark) -> None:
    """Replace the published mark durably (write, fsync, rename, fsync the directory)."""
    body = msgpack.packb({"v": 1, "gw": gateway_id, "epoch": mark.epoch, "seq": mark.seq})
    path = directory / MARK_NAME
    try:
        replace_atomically(path, encode_record(mark.seq, body, b""))
    except (OSError, DesanetError) as err:
        raise StreamError(f"cannot write the published mark {path}: {err}") from err


def read_mark(directory: Path, gateway_id: str) -> PublishedMark | None:
    """The published mark, or None when there is none; DamagedStateFile if it fails its checks."""
    path = directory / MARK_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StreamError(f"cannot read the published mark {path}: {err}") from err
    record = single_record(data)
    if record is None:
        raise DamagedStateFile(path, "the published mark fails its crc")
    seq, message = record
    try:
        body = msgpack.unpackb(message, raw=False)
        epoch, gw, body_seq = body["epoch"], body["gw"], body["seq"]
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as err:
        raise DamagedStateFile(path, f"the published mark cannot be read: {err}") from None
    if gw != gateway_id:
        raise StreamError(
            f"{path} belongs to gateway {gw!r}, not {gateway_id!r}: each gateway needs its own "
            "state_dir"
        )
    if not isinstance(epoch, str) or body_seq != seq or not isinstance(seq, int):
        raise DamagedStateFile(path, "the published mark holds no epoch and seq")
    return PublishedMark(epoch, seq)
