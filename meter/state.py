"""Persistence of the aggregator state and the stream's totals, so that seq and
`*_total` survive kill -9 and reboots.

The aggregator state is a set of named numpy arrays (`Aggregator.state()`).
Each journal record carries only the rows that changed since the previous
record (a "state change"), in the same crc-checked write as the message. A
checkpoint file holds the full state, the per-subscriber totals and the
(epoch, seq) they correspond to, as one crc-checked journal record; recovery
loads a checkpoint and applies the changes of every newer journal record,
giving exactly the state after the last journaled message. Checkpoints are
replaced atomically (desanet.durable); meter.recovery keeps two of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from desanet.durable import replace_atomically
from desanet.errors import DesanetError, StreamError
from desanet.meter.records import encode_record, single_record
from desanet.meter.wire import PreviousEpoch

StateArrays = dict[str, npt.NDArray[Any]]


def _full(arr: npt.NDArray[Any]) -> list[Any]:
    return ["full", arr.dtype.str, list(arr.shape), np.ascontiguousarray(arr).tobytes()]


def _array(dtype: str, shape: list[int], data: bytes) -> npt.NDArray[Any]:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def encode_state_change(prev: Mapping[str, npt.NDArray[Any]] | None, new: StateArrays) -> bytes:
    """The rows of `new` that differ from `prev` (every array in full when there is no `prev`)."""
    change: dict[str, Any] = {}
    for name, arr in new.items():
        old = prev.get(name) if prev is not None else None
        if old is None or old.shape != arr.shape or old.dtype != arr.dtype or arr.ndim == 0:
            change[name] = _full(arr)
            continue
        if arr.size == 0:
            continue
        diff = old != arr
        if arr.ndim > 1:
            diff = diff.reshape(arr.shape[0], -1).any(axis=1)
        rows = np.flatnonzero(diff)
        if rows.size:
            # Row numbers as u32 when they fit: the journal holds one per moved subscriber.
            index_type = np.uint32 if arr.shape[0] <= 2**32 else np.uint64
            change[name] = [
                "rows",
                np.dtype(index_type).str,
                rows.astype(index_type).tobytes(),
                np.ascontiguousarray(arr[rows]).tobytes(),
            ]
    if prev is not None:
        for name in prev:
            if name not in new:
                change[name] = ["gone"]
    return msgpack.packb(change) if change else b""


def apply_state_change(state: StateArrays, change: bytes) -> None:
    """Apply one journal record's state change to `state`, in place."""
    if not change:
        return
    try:
        items = msgpack.unpackb(change, raw=False)
        for name, entry in items.items():
            kind = entry[0]
            if kind == "full":
                state[name] = _array(entry[1], entry[2], entry[3])
            elif kind == "rows":
                arr = state[name]
                rows = np.frombuffer(entry[2], dtype=np.dtype(entry[1]))
                values = np.frombuffer(entry[3], dtype=arr.dtype)
                arr[rows] = values.reshape((rows.size, *arr.shape[1:]))
            elif kind == "gone":
                state.pop(name, None)
            else:
                raise ValueError(f"unknown entry kind {kind!r}")
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise StreamError(f"journal state change cannot be applied: {err}") from err


class DamagedStateFile(StreamError):
    """A durable file of the meter fails its integrity check (the message names the file)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


@dataclass
class Checkpoint:
    """Everything recovery needs at one (epoch, seq): aggregator state, totals, last t1."""

    epoch: str | None = None
    seq: int = 0
    t1_ms: int = 0
    state: StateArrays | None = None
    totals: dict[str, list[int]] = field(default_factory=dict)
    previous: PreviousEpoch | None = None

    def save(self, path: Path, gateway_id: str) -> None:
        """Replace the checkpoint file `path` atomically and durably."""
        prev = self.previous
        body = msgpack.packb(
            {
                "v": 2,
                "gw": gateway_id,
                "epoch": self.epoch,
                "seq": self.seq,
                "t1": self.t1_ms,
                "state": None
                if self.state is None
                else {name: _full(arr) for name, arr in self.state.items()},
                "totals": self.totals,
                "previous": None if prev is None else [prev.epoch, prev.seq, prev.published],
            }
        )
        try:
            replace_atomically(path, encode_record(self.seq, body, b""))
        except (OSError, DesanetError) as err:
            raise StreamError(f"cannot write checkpoint {path}: {err}") from err

    @classmethod
    def load(cls, path: Path, gateway_id: str) -> Checkpoint | None:
        """The checkpoint in `path`, None when there is none; DamagedStateFile if it is damaged."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StreamError(f"cannot read checkpoint {path}: {err}") from err
        record = single_record(data)
        if record is None:
            raise DamagedStateFile(path, "the checkpoint fails its crc")
        try:
            body = msgpack.unpackb(record[1], raw=False)
            gw = body.get("gw")
        except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as err:
            raise DamagedStateFile(path, f"the checkpoint cannot be read: {err}") from None
        if gw != gateway_id:
            raise StreamError(
                f"checkpoint {path} belongs to gateway {gw!r}, not {gateway_id!r}: "
                "each gateway needs its own state_dir"
            )
        try:
            return cls._from_body(body, record[0])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise DamagedStateFile(path, f"the checkpoint cannot be read: {err}") from None

    @classmethod
    def _from_body(cls, body: dict[str, Any], seq: int) -> Checkpoint:
        state, prev, epoch = body["state"], body.get("previous"), body.get("epoch")
        if body["seq"] != seq or not (epoch is None or isinstance(epoch, str)):
            raise ValueError("seq or epoch does not match the record")
        return cls(
            epoch=epoch,
            seq=seq,
            t1_ms=int(body["t1"]),
            state=None
            if state is None
            else {name: _array(e[1], e[2], e[3]) for name, e in state.items()},
            totals={str(k): [int(v[0]), int(v[1])] for k, v in body["totals"].items()},
            previous=None
            if prev is None
            else PreviousEpoch(str(prev[0]), int(prev[1]), _opt_int(prev[2])),
        )


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value
