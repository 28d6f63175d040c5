"""What both aggregator backends share: input checks and the persisted state format.

Keeping these in one module is what makes the Cython core and the numpy twin
accept the same inputs and restore the same state, byte for byte.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from desanet.errors import DesanetError, ValidationError

STATE_VERSION = 1
# Columns of a counter row, as ebpf/abi.py COUNTER_FIELDS: up bytes/packets, down bytes/packets.
N_COLUMNS = 4
# clock[2] bits: a poll happened (clock[0] valid); an interval is open (clock[1] valid).
CLOCK_POLLED = 1
CLOCK_OPEN = 2

U64 = npt.NDArray[np.uint64]


def check_n_slots(n_slots: int) -> int:
    """The slot count as an int, refused when it is not positive."""
    n = int(n_slots)
    if n <= 0:
        raise ValidationError(f"aggregator needs at least one slot, got {n_slots}")
    return n


def check_rate_tau(rate_tau_ms: float) -> float:
    """The rate smoothing time constant in ms, refused when not positive."""
    tau = float(rate_tau_ms)
    if not tau > 0:
        raise ValidationError(f"rate smoothing time constant must be > 0 ms, got {rate_tau_ms}")
    return tau


def as_cumulative(cumulative: object, n_slots: int) -> U64:
    """`cumulative` as a C-contiguous (n_slots, 4) uint64 array, without copying when it is one."""
    arr = np.asarray(cumulative)
    if arr.shape != (n_slots, N_COLUMNS):
        raise ValidationError(
            f"cumulative counters must have shape ({n_slots}, {N_COLUMNS}), got {arr.shape}"
        )
    if arr.dtype != np.uint64:
        if arr.dtype.kind not in "ui" or (arr.dtype.kind == "i" and arr.size and arr.min() < 0):
            raise ValidationError(
                f"cumulative counters must be non-negative integers, got dtype {arr.dtype}"
            )
        arr = arr.astype(np.uint64)
    return np.ascontiguousarray(arr)


def check_slot(slot: int, n_slots: int) -> int:
    """`slot` as an int inside [0, n_slots)."""
    s = int(slot)
    if not 0 <= s < n_slots:
        raise ValidationError(f"slot {slot} is outside the aggregator's 0..{n_slots - 1}")
    return s


def smoothing(dt_ms: int, rate_tau_ms: float) -> float:
    """Weight of the newest sample in the exponentially smoothed rate after `dt_ms`."""
    return 1.0 - math.exp(-dt_ms / rate_tau_ms)


def pack_state(
    last_raw: U64,
    total: U64,
    billed: U64,
    moved: npt.NDArray[np.uint8],
    clock: npt.NDArray[np.int64],
    source: npt.NDArray[np.uint8],
) -> dict[str, np.ndarray]:
    """The persisted state: only the slots holding anything, so idle capacity costs nothing."""
    n_slots = last_raw.shape[0]
    busy = np.flatnonzero(
        last_raw.any(axis=1) | total.any(axis=1) | billed.any(axis=1) | (moved != 0)
    ).astype(np.uint32)
    return {
        "version": np.array([STATE_VERSION], dtype=np.int64),
        "n_slots": np.array([n_slots], dtype=np.int64),
        "slots": busy,
        "last_raw": last_raw[busy].copy(),
        "total": total[busy].copy(),
        "billed": billed[busy].copy(),
        "moved": moved[busy].copy(),
        "clock": clock.copy(),
        "source": source.copy(),
    }


def unpack_state(
    state: dict[str, np.ndarray], n_slots: int
) -> tuple[U64, U64, U64, npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Full-size arrays (last_raw, total, billed, moved, clock, source) from a packed state."""
    try:
        version = int(np.asarray(state["version"])[0])
        slots = np.asarray(state["slots"], dtype=np.int64)
        rows = {k: np.asarray(state[k]) for k in ("last_raw", "total", "billed")}
        moved_rows = np.asarray(state["moved"], dtype=np.uint8)
        clock = np.array(state["clock"], dtype=np.int64)
        source = np.array(state["source"], dtype=np.uint8)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise DesanetError(f"aggregator state is incomplete or corrupt: {err}") from err
    if version != STATE_VERSION:
        raise DesanetError(
            f"aggregator state version {version} is not the supported {STATE_VERSION}"
        )
    k = slots.shape[0]
    if clock.shape != (3,) or moved_rows.shape != (k,):
        raise DesanetError("aggregator state is corrupt: clock or moved has the wrong shape")
    for name, value in rows.items():
        if value.shape != (k, N_COLUMNS) or value.dtype != np.uint64:
            raise DesanetError(f"aggregator state is corrupt: {name} is not ({k}, 4) uint64")
    if k and (slots.min() < 0 or slots.max() >= n_slots):
        raise DesanetError(
            f"aggregator state holds slot {int(slots.max())} but this gateway has only "
            f"{n_slots} slots; raise the capacity back before restarting"
        )
    full = []
    for name in ("last_raw", "total", "billed"):
        arr = np.zeros((n_slots, N_COLUMNS), dtype=np.uint64)
        arr[slots] = rows[name]
        full.append(arr)
    moved = np.zeros(n_slots, dtype=np.uint8)
    moved[slots] = moved_rows
    return full[0], full[1], full[2], moved, clock, source
