"""The unit of usage the aggregator produces, and the journal and the stream carry on.

One `UsageInterval` is what happened between two instants, as parallel column
arrays over the slots whose counters moved; `meter` maps slots to subscriber
ids when it encodes the v1 message (see docs/usage-stream.md). It lives here,
beside the aggregator that makes it, so that nothing in cython_ext imports
from a layer above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class UsageInterval:
    """Delivered usage of the slots that moved in [t0_ms, t1_ms), plus their running totals."""

    t0_ms: int
    t1_ms: int
    slots: npt.NDArray[np.uint32]
    up: U64
    down: U64
    up_pkts: U64
    down_pkts: U64
    up_total: U64
    down_total: U64

    def __len__(self) -> int:
        return int(self.slots.shape[0])
