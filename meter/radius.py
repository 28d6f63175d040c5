"""RADIUS accounting (RFC 2866, 2869) fed from the usage journal, the gateway's outbox.

`RadiusAccounting` runs one thread. It reads journal records after its
cursor in seq order, turns them and the gateway's events into
Accounting-Requests (the session model is in radius_sessions), sends them
(radius_transport) and, once every request of a batch is answered, moves its
cursor and saves its session book in one atomic write. A crash or an outage
never loses or reorders anything: after a restart the unanswered batch is
built again from the journal, identically, and sent again; the counters are
cumulative per session, so a request FreeRADIUS already stored changes nothing.

Gateway events are marks placed at the journal's current seq: the start of
the gateway (`RadiusAccounting()` notes Accounting-On), its stop (`close()`
notes Accounting-Off) and the end of one subscriber's session
(`end_session`, for a removal, a suspension with block or a new User-Name).
Marks are saved before the call returns, so a stop that RADIUS did not hear
yet is sent at the next start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack

from desanet.durable import replace_atomically
from desanet.errors import ConfigError, DesanetError, StreamError
from desanet.meter import wire
from desanet.meter.journal import Journal
from desanet.meter.radius_dictionary import load_dictionary
from desanet.meter.radius_sessions import (
    CAUSE_REMOVED,
    CAUSE_RENAMED,
    CAUSE_SUSPENDED,
    MARK_END,
    MARK_OFF,
    MARK_ON,
    Accountant,
    AcctRequest,
    Mark,
    SessionBook,
    SubscriberAttributes,
)
from desanet.meter.radius_transport import AccountingSender, RadiusServer

log = logging.getLogger(__name__)

BOOK_NAME = "radius-accounting.json"
MARKS_NAME = "radius-marks.json"
END_CAUSES = {"removed": CAUSE_REMOVED, "suspended": CAUSE_SUSPENDED, "renamed": CAUSE_RENAMED}


@dataclass(frozen=True)
class AccountingConfig:
    """Where and how often to account ([radius] in gateway.toml)."""

    servers: tuple[RadiusServer, ...]
    nas_ip: str = ""  # empty: the gateway's address towards the primary server
    interim_s: int = 300
    timeout_s: float = 2.0
    max_timeout_s: float = 16.0
    tries_per_server: int = 3
    window: int = 32
    batch_records: int = 256
    save_every_s: float = 60.0
    poll_s: float = 0.5
    stop_wait_s: float = 5.0
    dictionary_dir: Path = field(default_factory=lambda: Path("/usr/share/freeradius"))

    def __post_init__(self) -> None:
        if self.interim_s < 60:
            raise ConfigError(f"[radius] interim {self.interim_s}s: at least 60 s (RFC 2869 5.16)")


def _epoch_of(message: bytes) -> str:
    body = msgpack.unpackb(message, raw=False)
    epoch = body.get("epoch", "") if isinstance(body, dict) else ""
    return epoch if isinstance(epoch, str) else ""


class RadiusAccounting:
    """The journal-to-RADIUS forwarder of one gateway; `start()` runs it, `close()` stops it."""

    def __init__(
        self,
        gateway_id: str,
        journal: Journal,
        state_dir: Path,
        config: AccountingConfig,
        attributes_of: Callable[[str], SubscriberAttributes | None] = lambda sub: None,
    ) -> None:
        self.gateway_id = gateway_id
        self.journal = journal
        self.config = config
        self.state_dir = Path(state_dir)
        self._book_path = self.state_dir / BOOK_NAME
        self._marks_path = self.state_dir / MARKS_NAME
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: DesanetError | None = None
        self.sender = AccountingSender(
            config.servers,
            load_dictionary(config.dictionary_dir),
            timeout_s=config.timeout_s,
            max_timeout_s=config.max_timeout_s,
            tries_per_server=config.tries_per_server,
            window=config.window,
        )
        nas_ip = config.nas_ip or self.sender.local_address()
        book = self._load_book()
        self._marks: list[Mark] = [m for m in self._load_marks() if m.id > book.marks_done]
        self._next_mark = max([book.marks_done, *(m.id for m in self._marks)]) + 1
        self.accountant = Accountant(gateway_id, book, config.interim_s, attributes_of, nas_ip)
        self._owners: dict[str, str] = {}
        self._publish_owners()
        self._note(MARK_ON)

    @property
    def cursor(self) -> int:
        """The seq of the newest journal record RADIUS acknowledged everything of."""
        return self.accountant.book.cursor

    def session_owner(self, session_id: str) -> str | None:
        """The subscriber whose open session has this Acct-Session-Id (for Disconnect/CoA).

        Callable from any thread. It knows the sessions RADIUS was told of: those
        of the last acknowledged batch, not the batch still being sent.
        """
        with self._lock:
            return self._owners.get(session_id)

    def _publish_owners(self) -> None:
        # The book is the accounting thread's alone; other threads see this copy, replaced
        # whole under the lock once RADIUS acknowledged the batch that changed it.
        owners = {s.session_id: s.sub for s in self.accountant.book.sessions.values()}
        with self._lock:
            self._owners = owners

    def _load_book(self) -> SessionBook:
        try:
            doc = json.loads(self._book_path.read_bytes())
        except FileNotFoundError:
            # First start: account from now on, not the journal's whole history.
            return SessionBook(cursor=self.journal.last_seq)
        except (OSError, ValueError) as err:
            raise StreamError(
                f"{self._book_path}: unreadable ({err}); restore it or move it aside"
            ) from err
        try:
            book = SessionBook.from_json(doc)
        except (KeyError, TypeError, ValueError) as err:
            raise StreamError(f"{self._book_path}: not a RADIUS session book ({err})") from err
        self._resume(book)
        return book

    def _resume(self, book: SessionBook) -> None:
        """Check the cursor against the journal: a new life of it is accounted from its start.

        The cursor names a record of one journal life (epoch); if the journal no
        longer holds that record in that life, the gateway lost its state and
        every record now in the journal is usage RADIUS has not heard of.
        """
        first, last = self.journal.first_seq, self.journal.last_seq
        if first and book.epoch:
            at = book.cursor if first <= book.cursor <= last else first
            (_, message), *_ = self.journal.read(at, 1)
            same_life = _epoch_of(message) == book.epoch and book.cursor <= last
            if not same_life:
                log.warning(
                    "RADIUS: the journal is a new life (epoch %s, cursor was %s:%d): "
                    "accounting every record it holds, from seq %d",
                    _epoch_of(message),
                    book.epoch,
                    book.cursor,
                    first,
                )
                book.cursor = first - 1
                book.epoch = _epoch_of(message)
        elif book.cursor > last:
            log.error(
                "RADIUS: cursor %d is past the journal's end %d (journal replaced): "
                "accounting resumes at the journal's end",
                book.cursor,
                last,
            )
            book.cursor = last

    def _load_marks(self) -> list[Mark]:
        try:
            return [Mark(**m) for m in json.loads(self._marks_path.read_bytes())]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as err:
            raise StreamError(
                f"{self._marks_path}: unreadable ({err}); restore it or move it aside"
            ) from err

    def _note(self, kind: str, sub: str = "", cause: str = "") -> None:
        with self._lock:
            mark = Mark(self._next_mark, self.journal.last_seq, kind, int(time.time() * 1000))
            if sub:
                mark = Mark(mark.id, mark.after_seq, kind, mark.t_ms, sub, cause)
            self._next_mark += 1
            marks = [*self._marks, mark]
            data = json.dumps([asdict(m) for m in marks]).encode()
            replace_atomically(self._marks_path, data)
            self._marks = marks
        self._idle.clear()
        self._wake.set()

    def end_session(self, sub: str, why: str) -> None:
        """End `sub`'s session now: `why` is "removed", "suspended" (with block) or "renamed"."""
        if why not in END_CAUSES:
            raise ConfigError(f"RADIUS: unknown session end {why!r} ({', '.join(END_CAUSES)})")
        self._note(MARK_END, sub, END_CAUSES[why])

    def wake(self) -> None:
        """Look at the journal now (after a publish) instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        """Start the forwarding thread."""
        self._thread = threading.Thread(target=self._run, name="radius-accounting", daemon=True)
        self._thread.start()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until everything journaled so far is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            if self._idle.wait(0.05) and self._caught_up():
                return True
        return False

    def _caught_up(self) -> bool:
        with self._lock:
            done = self.accountant.book.marks_done
            pending = any(m.id > done for m in self._marks)
        return not pending and self.cursor >= self.journal.last_seq

    def close(self) -> None:
        """Note Accounting-Off, give RADIUS `stop_wait_s` to hear it, stop the thread."""
        if self._thread is None:
            self.sender.close()
            return
        self._note(MARK_OFF)
        if not self.wait_idle(self.config.stop_wait_s):
            log.warning("RADIUS: stopping with requests unanswered; they are sent at next start")
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._thread = None
        self.sender.close()

    def _run(self) -> None:
        last_save = time.monotonic()
        try:
            while not self._stop.is_set():
                saved = self._step()
                if saved is None:
                    return
                if saved:
                    last_save = time.monotonic()
                elif time.monotonic() - last_save >= self.config.save_every_s:
                    self._save(self._marks_done())
                    last_save = time.monotonic()
                if self._caught_up():
                    self._idle.set()
                    self._wake.wait(self.config.poll_s)
                    self._wake.clear()
        except DesanetError as err:
            log.error("RADIUS accounting stopped: %s", err)
            self.error = err

    def _marks_done(self) -> int:
        return self.accountant.book.marks_done

    def _step(self) -> bool | None:
        """One batch: True if it was sent and saved, False if it had nothing to send,
        None when stopped before RADIUS answered it (nothing saved)."""
        book = self.accountant.book
        records = self.journal.read(book.cursor + 1, self.config.batch_records)
        if records and records[0][0] > book.cursor + 1:
            log.error(
                "RADIUS: journal records %d-%d were removed by retention before RADIUS "
                "acknowledged them: their usage is missing from accounting",
                book.cursor + 1,
                records[0][0] - 1,
            )
        with self._lock:
            marks = [m for m in self._marks if m.id > book.marks_done]
        requests: list[AcctRequest] = []
        done_marks = book.marks_done
        position, epoch = book.cursor, book.epoch
        for seq, message in records:
            while marks and marks[0].after_seq < seq:
                requests.extend(self.accountant.mark(marks[0]))
                done_marks = marks.pop(0).id
            msg = wire.decode_usage(message)
            epoch = _epoch_of(message)
            requests.extend(self.accountant.record(seq, msg, epoch))
            position = seq
        while marks and marks[0].after_seq <= position:
            requests.extend(self.accountant.mark(marks[0]))
            done_marks = marks.pop(0).id
        if not requests:
            book.cursor, book.epoch, book.marks_done = position, epoch, done_marks
            return False
        if not self.sender.send_all(requests, self._stop):
            return None
        book.cursor, book.epoch = position, epoch
        self._save(done_marks)
        self._publish_owners()
        return True

    def _save(self, marks_done: int) -> None:
        book = self.accountant.book
        book.marks_done = marks_done
        replace_atomically(self._book_path, json.dumps(book.to_json()).encode())
        with self._lock:
            self._marks = [m for m in self._marks if m.id > marks_done]


def subscriber_attributes(
    sub: str, prefixes: Sequence[str], mac: str | None = None, user_name: str | None = None
) -> SubscriberAttributes:
    """What RADIUS names a subscriber by: its first IPv4 address, first IPv6 prefix, MAC."""
    ipv4 = next((p.split("/")[0] for p in prefixes if ":" not in p and _is_host(p)), None)
    ipv6 = next((p if "/" in p else f"{p}/128" for p in prefixes if ":" in p), None)
    return SubscriberAttributes(user_name or sub, ipv4, ipv6, mac)


def _is_host(prefix: str) -> bool:
    return "/" not in prefix or prefix.endswith("/32")
