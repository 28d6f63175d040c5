"""Counter polling: read every slot of the datapath's counters, feed the aggregator.

`CounterReader` reaches an attached datapath through its pins alone: the
summing program pinned beside the per-CPU `counters` map adds every slot's
CPUs up inside the kernel (ebpf/counter_sums.py, bpf(2) only: no BCC, no
compiler in this process) and the reader returns the cumulative (n_slots, 4)
sums. On top of that it names the map instance it reads (boot id + the
kernel's map id) and notices when the datapath pinned a new map.
`Poller` hands each read to an aggregator with the identity of the map it
came from, so a recreated map or a reboot rebases the deltas instead of
losing or inventing bytes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from desanet.ebpf import abi
from desanet.ebpf.counter_sums import CounterSums
from desanet.errors import DatapathError

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class CounterReader:
    """Cumulative per-slot counters of an attached datapath, summed over CPUs in the kernel."""

    def __init__(self, pin_dir: Path) -> None:
        """Open the counters pinned in `pin_dir` and the summing program beside them."""
        self.pin_dir = pin_dir
        self.path = pin_dir / abi.MAP_COUNTERS
        if not self.path.exists():
            raise DatapathError(
                f"no counters pinned at {self.path}: is the datapath attached (desanet run)?"
            )
        # The pin is noted before the map is opened: a map pinned in between is then
        # caught by the next repinned(), never missed.
        self._pin = self._pin_stat()
        self._sums = CounterSums.open(pin_dir)
        self.n_slots = self._sums.n_slots
        # Names this map instance across restarts: a new map or a reboot changes it.
        self.identity = BOOT_ID.read_text().strip().encode() + f"/{self._sums.counters_id}".encode()

    @classmethod
    def open(cls, pin_dir: Path | str) -> CounterReader:
        """Open the counters of the datapath whose maps are pinned in `pin_dir`."""
        return cls(Path(pin_dir))

    @classmethod
    def for_datapath(cls, gateway_id: str, lan: str, bpffs: Path = abi.BPFFS) -> CounterReader:
        """Open the counters of the datapath attached to `lan` on gateway `gateway_id`."""
        return cls(abi.pin_dir(gateway_id, lan, bpffs))

    def _pin_stat(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    def repinned(self) -> bool:
        """True when the pin now names another map (the datapath recreated it): reopen then."""
        try:
            return self._pin_stat() != self._pin
        except FileNotFoundError:
            return True

    def reopen(self) -> CounterReader:
        """A reader of the map pinned at this reader's directory now; this one is closed."""
        fresh = CounterReader(self.pin_dir)
        self.close()
        return fresh

    def read(self) -> npt.NDArray[np.uint64]:
        """Cumulative counters summed over CPUs, (n_slots, 4) uint64; valid until the next read."""
        return self._sums.read()

    def close(self) -> None:
        """Release the summing program and the maps."""
        self._sums.close()

    def __enter__(self) -> CounterReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def now_ms() -> int:
    """Unix time in ms, the clock of usage intervals."""
    return time.time_ns() // 1_000_000


class CounterSource(Protocol):
    """What the poller reads: CounterReader, or a reader wrapping one (meter.delivered)."""

    n_slots: int

    @property
    def identity(self) -> bytes: ...

    def read(self) -> npt.NDArray[np.uint64]: ...

    def repinned(self) -> bool: ...

    def reopen(self) -> CounterSource: ...

    def close(self) -> None: ...


class Poller:
    """One step of the meter loop: read the counters, account them in the aggregator."""

    def __init__(self, reader: CounterSource, aggregator: Any) -> None:
        if aggregator.n_slots != reader.n_slots:
            raise DatapathError(
                f"the aggregator has {aggregator.n_slots} slots but the counters map "
                f"{reader.n_slots}: restart with the datapath's capacity"
            )
        self.reader = reader
        self.aggregator = aggregator

    def poll(self, t_ms: int | None = None) -> int:
        """Read and account the counters; returns how many slots moved since the last poll."""
        if self.reader.repinned():
            self.reader = self.reader.reopen()
        # Checked every poll: the aggregator may have been restored from a journal
        # written while another map (or another boot) was counting.
        self.aggregator.use_source(self.reader.identity)
        cumulative = self.reader.read()
        return int(self.aggregator.poll(cumulative, now_ms() if t_ms is None else t_ms))
