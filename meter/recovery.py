"""How the meter finds its state at start: continue the epoch, or begin a new one.

The meter's durable files live in `<state_dir>/stream/`:

    journal/*.seg                      the journal (meter.journal), one epoch
    checkpoint-a.bin, checkpoint-b.bin two checkpoints (meter.state); each save replaces the older
    published.mark                     the newest (epoch, seq) published (meter.epoch)

An epoch continues only when all of them agree: the journal names an epoch,
the published mark is of that epoch and the journal holds every seq it names,
and a checkpoint of that epoch is continued by the journal (the newest one, or
the other if the newest is damaged). Then a torn tail beyond the published
seqs is cut, and the state is the checkpoint plus the journal's records.

Anything else is lost or damaged state, and a new epoch begins, carrying the
newest state that can still be rebuilt (a checkpoint, plus the journal records
that continue it), so totals go on from there; seqs restart at 1 and no seq of
an old epoch is ever reused. The new epoch's files are prepared in
`stream.new/` and installed by renames; what they replace is moved, untouched,
to `replaced/<UTC time>-before-<new epoch>/` for the operator. A state_dir from before
epochs (`journal/` and `checkpoint.bin` at its top) is read the same way.
Damage that would cut valid records is never a new epoch: meter.journal
refuses it, and the service does not start.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from desanet.durable import fsync_dir
from desanet.errors import StreamError
from desanet.meter import wire
from desanet.meter.epoch import MARK_NAME, PublishedMark, new_epoch, read_mark, write_mark
from desanet.meter.journal import Journal, Retention
from desanet.meter.state import Checkpoint, DamagedStateFile, StateArrays, apply_state_change
from desanet.meter.wire import PreviousEpoch

log = logging.getLogger(__name__)

STREAM_DIR = "stream"
CHECKPOINT_NAMES = ("checkpoint-a.bin", "checkpoint-b.bin")
_LEGACY_CHECKPOINT = "checkpoint.bin"


@dataclass(frozen=True)
class _Files:
    """One layout of the meter's files: `stream/`, or the legacy one at the state_dir's top."""

    root: Path
    journal: Path
    checkpoints: tuple[Path, ...]
    mark_dir: Path | None
    moved: tuple[Path, ...]

    @classmethod
    def stream(cls, root: Path) -> _Files:
        points = tuple(root / n for n in CHECKPOINT_NAMES)
        return cls(root, root / "journal", points, root, (root,))

    @classmethod
    def legacy(cls, state_dir: Path) -> _Files:
        journal, point = state_dir / "journal", state_dir / _LEGACY_CHECKPOINT
        return cls(state_dir, journal, (point,), None, (journal, point))


class Checkpoints:
    """The two checkpoint slots: a save replaces the older one, so one always survives a crash."""

    def __init__(self, paths: tuple[Path, ...], gateway_id: str, seqs: list[int | None]) -> None:
        self.paths = paths
        self.gateway_id = gateway_id
        self.seqs = seqs

    def save(self, checkpoint: Checkpoint) -> None:
        """Write `checkpoint` over the older (or damaged) slot."""

        def age(i: int) -> int:
            seq = self.seqs[i]
            return -1 if seq is None else seq

        slot = min(range(len(self.paths)), key=age)
        checkpoint.save(self.paths[slot], self.gateway_id)
        self.seqs[slot] = checkpoint.seq

    @property
    def latest_seq(self) -> int:
        return max((s for s in self.seqs if s is not None), default=0)

    @property
    def oldest_seq(self) -> int:
        """Journal records after this seq are needed should the newest checkpoint be damaged."""
        return min((s for s in self.seqs if s is not None), default=0)


@dataclass
class Recovered:
    """The state the meter starts from, and the epoch it publishes in."""

    epoch: str
    directory: Path
    journal: Journal
    checkpoints: Checkpoints
    seq: int = 0
    t1_ms: int = 0
    state: StateArrays | None = None
    totals: dict[str, tuple[int, int]] = field(default_factory=dict)
    previous: PreviousEpoch | None = None
    new_epoch_reason: str | None = None


def recover(state_dir: Path, gateway_id: str, retention: Retention, now_ms: int) -> Recovered:
    """Continue the stream in `state_dir`, or start a new epoch (see the module docstring)."""
    state_dir = Path(state_dir)
    _finish_switch(state_dir)
    files = _current_files(state_dir)
    journal = _open_journal(files, retention)
    slots, damaged = _load_checkpoints(files, gateway_id)
    mark, mark_problem = _load_mark(files, gateway_id)
    j_epoch = journal.epoch if journal is not None else None
    last = journal.last_seq if journal is not None else 0
    first = journal.first_seq if journal is not None else 0
    checkpoints = [c for c in slots if c is not None]
    usable = [c for c in checkpoints if c.epoch == j_epoch and first - 1 <= c.seq <= last]
    ahead = [c for c in checkpoints if c.epoch == j_epoch and c.seq > last]
    if journal is None:
        usable = ahead = []
    # The newest state that can be rebuilt: a checkpoint beyond the journal, else the newest
    # checkpoint the journal continues (with its records), else any checkpoint.
    base = max(ahead or usable or checkpoints, key=lambda c: c.seq, default=None)
    with_journal = bool(usable) and not ahead
    seq, t1, state, totals = _rebuild(base, journal if with_journal else None)
    reason = _why_new(files, j_epoch, last, usable, ahead, mark, mark_problem, damaged)
    # reason None implies all of these; the checks tell mypy so.
    if reason is None and files and journal and base and j_epoch:
        journal.repair()
        _remove_temporaries(files.root)
        log.info(
            "usage stream %s: epoch %s continues at seq %d (checkpoint %d + %d journal records)",
            gateway_id,
            j_epoch,
            seq,
            base.seq,
            seq - base.seq,
        )
        seqs = [c.seq if c is not None and c.epoch == j_epoch else None for c in slots]
        return Recovered(
            j_epoch,
            files.root,
            journal,
            Checkpoints(files.checkpoints, gateway_id, seqs),
            seq,
            t1,
            state,
            totals,
            base.previous,
        )
    if journal is not None:
        journal.close()
    state_epoch = j_epoch if with_journal else (base.epoch if base is not None else None)
    previous = _previous(state_epoch, seq, j_epoch, mark)
    epoch = new_epoch(now_ms)
    carried = Checkpoint(epoch, 0, t1, state, {k: list(v) for k, v in totals.items()}, previous)
    aside = _switch(state_dir, files, gateway_id, carried, retention)
    (log.info if not reason else log.warning)(
        "usage stream %s: new epoch %s because %s%s",
        gateway_id,
        epoch,
        reason or "there was no previous state",
        "" if aside is None else f"; the files it replaces are kept in {aside}",
    )
    root = state_dir / STREAM_DIR
    return Recovered(
        epoch,
        root,
        Journal(root / "journal", retention),
        Checkpoints(_Files.stream(root).checkpoints, gateway_id, [0, 0]),
        0,
        t1,
        state,
        totals,
        previous,
        reason or "there was no previous state",
    )


def _previous(
    state_epoch: str | None, seq: int, j_epoch: str | None, mark: PublishedMark | None
) -> PreviousEpoch | None:
    """The epoch a new one follows (the last published), and how much of it the state holds."""
    epoch = mark.epoch if mark is not None else (j_epoch or state_epoch)
    if epoch is None:
        return None
    included = seq if state_epoch == epoch else 0
    return PreviousEpoch(epoch, included, mark.seq if mark is not None else None)


def _why_new(
    files: _Files | None,
    j_epoch: str | None,
    last: int,
    usable: list[Checkpoint],
    ahead: list[Checkpoint],
    mark: PublishedMark | None,
    mark_problem: str | None,
    damaged: list[str],
) -> str | None:
    """Why the epoch cannot continue: None if it can, "" when there was no state at all."""
    if files is None:
        return ""
    if files.mark_dir is None:
        return "the state is from before stream epochs"
    if j_epoch is None:
        return "the journal is missing or names no epoch"
    if mark_problem is not None:
        return mark_problem
    if mark is None:
        return "the published mark is missing"
    if mark.epoch != j_epoch:
        return f"the journal is of epoch {j_epoch}, the published mark of {mark.epoch}"
    if mark.seq > last:
        return (
            f"the journal ends at seq {last} but seq {mark.seq} of epoch {j_epoch} was "
            f"published: seqs {last + 1}..{mark.seq} are lost"
        )
    if ahead:
        return f"a checkpoint of epoch {j_epoch} is at seq {ahead[0].seq}, beyond the journal"
    if not usable:
        extra = f" ({'; '.join(damaged)})" if damaged else ""
        return f"no checkpoint of epoch {j_epoch} is continued by the journal{extra}"
    return None


def _rebuild(
    base: Checkpoint | None, journal: Journal | None
) -> tuple[int, int, StateArrays | None, dict[str, tuple[int, int]]]:
    """(seq, t1, state, totals) after `base` and the journal records that follow it."""
    if base is None:
        return 0, 0, None, {}
    seq, t1 = base.seq, base.t1_ms
    totals = {k: (int(v[0]), int(v[1])) for k, v in base.totals.items()}
    state = None if base.state is None else {k: v.copy() for k, v in base.state.items()}
    if journal is not None:
        for rec_seq, message, change in journal.records_after(base.seq):
            if rec_seq != seq + 1:
                raise StreamError(f"journal jumps from seq {seq} to {rec_seq}: it was edited")
            if state is None:
                state = {}
            apply_state_change(state, change)
            msg = wire.decode_usage(message)
            totals.update(zip(msg.sub, zip(msg.up_total, msg.down_total, strict=True), strict=True))
            seq, t1 = rec_seq, max(t1, msg.t1)
    return seq, t1, state or None, totals


def _remove_temporaries(root: Path) -> None:
    """Temporary files a kill -9 left behind while a checkpoint or the mark was replaced."""
    for name in (MARK_NAME, *CHECKPOINT_NAMES):
        for leftover in root.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _finish_switch(state_dir: Path) -> None:
    """Complete or undo a switch to a new epoch that a crash interrupted."""
    new, current = state_dir / f"{STREAM_DIR}.new", state_dir / STREAM_DIR
    if not new.exists():
        return
    try:
        if current.exists():
            shutil.rmtree(new)  # the preparation did not finish: the old files still stand
        else:
            os.replace(new, current)
        fsync_dir(state_dir)
    except OSError as err:
        raise StreamError(f"cannot finish the switch to a new epoch in {state_dir}: {err}") from err


def _current_files(state_dir: Path) -> _Files | None:
    if (state_dir / STREAM_DIR).exists():
        return _Files.stream(state_dir / STREAM_DIR)
    legacy = _Files.legacy(state_dir)
    return legacy if any(p.exists() for p in legacy.moved) else None


def _open_journal(files: _Files | None, retention: Retention) -> Journal | None:
    if files is None or not files.journal.is_dir():
        return None
    return Journal(files.journal, retention)


def _load_checkpoints(
    files: _Files | None, gateway_id: str
) -> tuple[list[Checkpoint | None], list[str]]:
    """The checkpoint of each slot (None: missing or damaged) and what was damaged."""
    slots: list[Checkpoint | None] = []
    damaged: list[str] = []
    for path in files.checkpoints if files is not None else ():
        try:
            slots.append(Checkpoint.load(path, gateway_id))
        except DamagedStateFile as err:
            damaged.append(str(err))
            slots.append(None)
    return slots, damaged


def _load_mark(files: _Files | None, gateway_id: str) -> tuple[PublishedMark | None, str | None]:
    if files is None or files.mark_dir is None:
        return None, None
    try:
        return read_mark(files.mark_dir, gateway_id), None
    except DamagedStateFile as err:
        return None, str(err)


def _switch(
    state_dir: Path,
    files: _Files | None,
    gateway_id: str,
    carried: Checkpoint,
    retention: Retention,
) -> Path | None:
    """Install the files of the new epoch `carried.epoch`; returns where the old ones went."""
    epoch = carried.epoch
    if epoch is None:
        raise StreamError("a new epoch needs an epoch id")
    new = state_dir / f"{STREAM_DIR}.new"
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        new.mkdir(mode=0o700)
        Journal.create(new / "journal", epoch, retention).close()
        for name in CHECKPOINT_NAMES:
            carried.save(new / name, gateway_id)
        write_mark(new, gateway_id, PublishedMark(epoch, 0))
        fsync_dir(new)
        aside = None
        if files is not None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = state_dir / "replaced" / f"{stamp}-before-{epoch}"
            aside.mkdir(mode=0o700, parents=True)
            for path in files.moved:
                if path.exists():
                    os.replace(path, aside / path.name)
            fsync_dir(aside)
        os.replace(new, state_dir / STREAM_DIR)
        fsync_dir(state_dir)
    except OSError as err:
        raise StreamError(f"cannot start a new epoch in {state_dir}: {err}") from err
    return aside
