"""The forwarder's place in the journal (the outbox): its cursor file and where to resume.

The cursor is the last seq, in one journal life (epoch), up to which the hub
acknowledged every message. On start the forwarder checks it against the
journal: the message at the cursor's seq must be of the cursor's epoch, or
the journal is a new life and is forwarded from its first message; a cursor
older than the journal's first message means retention dropped messages the
hub never had, which is logged with their seqs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import msgpack

from desanet.durable import replace_atomically
from desanet.errors import StreamError
from desanet.meter.journal import Journal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cursor:
    """The last seq of journal life `epoch` up to which the hub acknowledged every message."""

    epoch: str | None = None
    seq: int = 0

    @classmethod
    def load(cls, path: Path) -> Cursor:
        """The saved cursor, or the start when there is none yet."""
        try:
            body = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as err:
            raise StreamError(
                f"fleet cursor {path} is unreadable ({err}); delete it to forward the whole "
                "journal again (the hub drops what it already holds)"
            ) from None
        epoch, seq = body.get("epoch"), body.get("seq")
        if not (epoch is None or isinstance(epoch, str)) or not isinstance(seq, int) or seq < 0:
            raise StreamError(f"fleet cursor {path} holds {body!r}, not an epoch and a seq")
        return cls(epoch, seq)

    def save(self, path: Path, sent: int | None = None) -> None:
        """Replace the cursor file durably (fsync'd before this returns).

        `sent`: the mark at or above every seq ever published in this epoch (the
        forwarder raises it before publishing beyond it); compaction merges only
        above it, so no group the hub may hold a part of is rewritten.
        """
        body: dict[str, object] = {"epoch": self.epoch, "seq": self.seq}
        if sent is not None:
            body["sent"] = sent
        replace_atomically(path, json.dumps(body).encode())

    @staticmethod
    def load_sent(path: Path) -> int | None:
        """The saved sent mark (see `save`), or None when the file has none."""
        try:
            sent = json.loads(Path(path).read_text()).get("sent")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise StreamError(f"fleet cursor {path} is unreadable ({err})") from None
        return sent if isinstance(sent, int) and sent >= 0 else None


def message_epoch(message: bytes, fallback: str | None) -> str:
    """The `epoch` of an encoded usage message, or `fallback` for messages written before it."""
    return message_meta(message, fallback)[0]


def message_meta(message: bytes, fallback: str | None) -> tuple[str, bool]:
    """(epoch, whether it is an empty message of a merged minute) of an encoded usage message.

    The empty messages compaction leaves (meter.compact, key `merged_into`) are not
    sent to the hub: the merged message names their seqs in its `merged` range.
    """
    try:
        body = msgpack.unpackb(message, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise StreamError(f"journaled message is not valid msgpack: {err}") from None
    if not isinstance(body, dict):
        body = {}
    epoch = body.get("epoch")
    placeholder = "merged_into" in body
    if isinstance(epoch, str) and epoch:
        return epoch, placeholder
    if fallback is None:
        raise StreamError(
            "journaled usage message has no epoch and the forwarder was given none: "
            "it cannot name the message for the hub"
        )
    return fallback, placeholder


def resume(journal: Journal, cursor: Cursor, fallback_epoch: str | None) -> Cursor:
    """The cursor to forward after (the next seq is its seq + 1), checked against `journal`."""
    first, last = journal.first_seq, journal.last_seq
    if not first:
        return Cursor()
    (_, oldest), *_ = journal.read(first, 1)
    first_epoch = message_epoch(oldest, fallback_epoch)
    if cursor.epoch is None:
        return Cursor(first_epoch, first - 1)
    if first <= cursor.seq <= last:
        (_, at_cursor), *_ = journal.read(cursor.seq, 1)
        if message_epoch(at_cursor, fallback_epoch) == cursor.epoch:
            return cursor
    elif cursor.seq < first and first_epoch == cursor.epoch:
        if cursor.seq + 1 < first:
            log.error(
                "fleet: seqs %d-%d left the journal before the hub had them (retention): "
                "billing gets their totals, not their intervals",
                cursor.seq + 1,
                first - 1,
            )
        return Cursor(cursor.epoch, first - 1)
    log.warning(
        "fleet: the journal is not the life the cursor %s:%d was in; forwarding all of it",
        cursor.epoch,
        cursor.seq,
    )
    return Cursor(first_epoch, first - 1)
