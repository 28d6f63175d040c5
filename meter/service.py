"""The gateway side of the usage stream: journal, publish, replay, all in one object.

The gateway's service loop owns the poll timer and calls `publish(interval,
aggregator.state())` once per interval. `MeterService` numbers the message,
journals it together with the aggregator state change (fsync), then publishes
it; every `snapshot_every` intervals it also publishes a full snapshot of the
totals. On construction it recovers seq, totals and the aggregator state from
the checkpoint and the journal; pass `restored_state` to `Aggregator.restore`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from desanet.errors import StreamError
from desanet.meter import wire
from desanet.meter.journal import Journal, Retention
from desanet.meter.keys import ServerSecurity, secure_server, start_authenticator
from desanet.meter.replay import ReplayServer
from desanet.meter.state import Checkpoint, StateArrays, apply_state_change, encode_state_change
from desanet.meter.usage import UsageInterval

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Endpoints, security and cadence of the usage stream ([publish] in gateway.toml)."""

    usage_endpoint: str
    replay_endpoint: str
    security: ServerSecurity
    retention: Retention = field(default_factory=Retention)
    snapshot_every: int = 60
    checkpoint_every: int = 300
    send_hwm: int = 10_000


class MeterService:
    """Journals and publishes usage intervals and serves replay; recovers on construction."""

    def __init__(
        self,
        gateway_id: str,
        state_dir: Path,
        config: StreamConfig,
        subscribers: Mapping[int, str],
    ) -> None:
        if not gateway_id:
            raise StreamError("the usage stream needs a gateway id ([gateway] id)")
        self.gateway_id = gateway_id
        self.config = config
        self.state_dir = Path(state_dir)
        self._lock = threading.Lock()
        self._topic = wire.topic(gateway_id)
        self._ids: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self._mapped: npt.NDArray[np.bool_] = np.empty(0, dtype=bool)
        # Totals of mapped slots live in arrays (cheap per interval); `_totals` holds the rest
        # (recovered, or whose slot was reassigned) and `_all_totals()` merges both.
        self._slot_totals: npt.NDArray[np.uint64] = np.zeros((0, 2), dtype=np.uint64)
        self._has_total: npt.NDArray[np.bool_] = np.empty(0, dtype=bool)
        self._totals: dict[str, tuple[int, int]] = {}
        self.set_subscribers(subscribers)
        self._intervals = 0
        self.journal = Journal(self.state_dir / "journal", config.retention)
        self._checkpoint = Checkpoint.load(self.state_dir, gateway_id)
        self._recover()
        self.restored_state: StateArrays | None = (
            None if self._state is None else {k: v.copy() for k, v in self._state.items()}
        )
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth = None
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: ReplayServer | None = None
        try:
            self._auth = start_authenticator(self._ctx, config.security)
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.linger = 1000
            self._pub.sndhwm = config.send_hwm
            # Heartbeats let the gateway drop billing connections that died on the link.
            self._pub.heartbeat_ivl = 10_000
            self._pub.heartbeat_timeout = 30_000
            secure_server(self._pub, config.security, config.usage_endpoint)
            try:
                self._pub.bind(config.usage_endpoint)
            except zmq.ZMQError as err:
                raise StreamError(
                    f"cannot bind the usage endpoint {config.usage_endpoint}: {err}"
                ) from err
            self.usage_endpoint = str(self._pub.getsockopt_string(zmq.LAST_ENDPOINT))
            self._replay = ReplayServer(
                self._ctx, config.replay_endpoint, config.security, self.journal, self.snapshot
            )
            self.replay_endpoint = self._replay.endpoint
        except BaseException:
            self._close_sockets()
            raise

    @property
    def last_seq(self) -> int:
        """The seq of the newest journaled message (0 before the first)."""
        return self._seq

    @property
    def last_t1_ms(self) -> int:
        """The end stamp of the newest journaled interval (0 before the first)."""
        return self._t1

    def set_subscribers(self, subscribers: Mapping[int, str]) -> None:
        """Replace the slot -> subscriber id mapping (after a provisioning change)."""
        size = max(subscribers, default=-1) + 1
        ids: npt.NDArray[np.object_] = np.full(size, None, dtype=object)
        mapped = np.zeros(size, dtype=bool)
        for slot, sub in subscribers.items():
            ids[slot] = sub
            mapped[slot] = True
        with self._lock:
            self._totals = self._all_totals()
            self._ids, self._mapped = ids, mapped
            self._slot_totals = np.zeros((size, 2), dtype=np.uint64)
            self._has_total = np.zeros(size, dtype=bool)

    def _all_totals(self) -> dict[str, tuple[int, int]]:
        totals = dict(self._totals)
        slots = np.flatnonzero(self._has_total)
        values = self._slot_totals[slots].tolist()
        totals.update(zip(self._ids[slots].tolist(), map(tuple, values), strict=True))
        return totals

    def _recover(self) -> None:
        ckpt = self._checkpoint
        self._seq, self._t1 = ckpt.seq, ckpt.t1_ms
        self._totals = {k: (int(v[0]), int(v[1])) for k, v in ckpt.totals.items()}
        self._state = ckpt.state
        last = self.journal.last_seq
        if last and last < ckpt.seq:
            raise StreamError(
                f"journal in {self.journal.directory} ends at seq {last} but the checkpoint is at "
                f"{ckpt.seq}: the journal was replaced; move the state_dir aside to start anew"
            )
        replayed = 0
        for seq, message, change in self.journal.records_after(ckpt.seq):
            if seq != self._seq + 1 and self._seq:
                raise StreamError(f"journal jumps from seq {self._seq} to {seq}: it was edited")
            if self._state is None:
                self._state = {}
            apply_state_change(self._state, change)
            self._apply_totals(wire.decode_usage(message))
            self._seq = seq
            replayed += 1
        if self._state is not None and not self._state:
            self._state = None
        log.info(
            "usage stream %s: recovered at seq %d (checkpoint %d + %d journal records)",
            self.gateway_id,
            self._seq,
            ckpt.seq,
            replayed,
        )

    def _apply_totals(self, msg: wire.UsageMessage) -> None:
        pairs = zip(msg.up_total, msg.down_total, strict=True)
        self._totals.update(zip(msg.sub, pairs, strict=True))
        self._t1 = max(self._t1, msg.t1)

    def publish(
        self,
        interval: UsageInterval,
        aggregator_state: Mapping[str, Any],
        events: Sequence[wire.UsageEvent] = (),
    ) -> int:
        """Journal then publish one interval and the events it saw; returns its seq.

        Raises StreamError if the message could not be journaled (nothing was sent).
        """
        state = {k: np.array(v, copy=True) for k, v in aggregator_state.items()}
        with self._lock:
            if self._pub is None:
                raise StreamError("the usage stream is closed: nothing was journaled")
            slots = interval.slots.astype(np.int64, copy=False)
            mask = slots < self._mapped.shape[0]
            mask[mask] = self._mapped[slots[mask]]
            if not mask.all():
                unknown = slots[~mask]
                unknown = unknown[unknown != 0]
                if unknown.size:
                    log.warning("usage for unmapped slots %s not published", unknown[:10].tolist())
            sub_list: list[str] = self._ids[slots[mask]].tolist()
            columns = {name: getattr(interval, name)[mask].tolist() for name in wire.COLUMNS}
            seq = self._seq + 1
            message = wire.encode_usage(
                self.gateway_id,
                seq,
                interval.t0_ms,
                interval.t1_ms,
                sub_list,
                columns,
                events=events,
            )
            self.journal.append(seq, message, encode_state_change(self._state, state))
            self._seq, self._state = seq, state
            moved = slots[mask]
            self._slot_totals[moved, 0] = interval.up_total[mask]
            self._slot_totals[moved, 1] = interval.down_total[mask]
            self._has_total[moved] = True
            self._t1 = max(self._t1, interval.t1_ms)
            self._send(message)
            self._intervals += 1
            if self._intervals % self.config.snapshot_every == 0:
                self._publish_snapshot()
            if self._seq - self._checkpoint.seq >= self.config.checkpoint_every:
                self._save_checkpoint()
        return seq

    def publish_snapshot(self) -> int:
        """Journal and publish a full snapshot of every subscriber's totals now; returns its seq."""
        with self._lock:
            self._publish_snapshot()
            return self._seq

    def _publish_snapshot(self) -> None:
        totals = self._all_totals()
        subs = list(totals)
        zeros = [0] * len(subs)
        columns = {
            "up": zeros,
            "down": zeros,
            "up_pkts": zeros,
            "down_pkts": zeros,
            "up_total": [totals[s][0] for s in subs],
            "down_total": [totals[s][1] for s in subs],
        }
        seq = self._seq + 1
        message = wire.encode_usage(
            self.gateway_id, seq, self._t1, self._t1, subs, columns, snapshot=True
        )
        self.journal.append(seq, message, b"")
        self._seq = seq
        self._send(message)

    def _send(self, message: bytes) -> None:
        if self._pub is None:
            raise StreamError("the usage stream is closed")
        # PUB never blocks: a subscriber too slow for the high-water mark loses messages and
        # recovers them by seq from the replay endpoint.
        self._pub.send_multipart([self._topic, message], zmq.NOBLOCK)

    def snapshot(self) -> dict[str, Any]:
        """Every subscriber's totals and the seq they are current at (the replay snapshot)."""
        with self._lock:
            totals = self._all_totals()
            subs = list(totals)
            return {
                "v": wire.VERSION,
                "gw": self.gateway_id,
                "seq": self._seq,
                "t1": self._t1,
                "sub": subs,
                "up_total": [totals[s][0] for s in subs],
                "down_total": [totals[s][1] for s in subs],
            }

    def _save_checkpoint(self) -> None:
        ckpt = Checkpoint(
            self._seq, self._t1, self._state, {k: list(v) for k, v in self._all_totals().items()}
        )
        ckpt.save(self.state_dir, self.gateway_id)
        self._checkpoint = ckpt
        self.journal.prune(ckpt.seq)

    def close(self) -> None:
        """Checkpoint, stop the replay thread, close sockets and the journal."""
        with self._lock:
            if self._pub is None:
                return
            self._save_checkpoint()
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self._replay is not None:
            self._replay.close()
            self._replay = None
        if self._pub is not None:
            self._pub.close()
            self._pub = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        with contextlib.suppress(zmq.ZMQError):
            self._ctx.term()
        self.journal.close()
