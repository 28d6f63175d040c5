"""The RADIUS accounting session model: usage messages and gateway events in, requests out.

A session is one subscriber's delivered usage in one UTC calendar month
during one run of the gateway:

1. it starts (Accounting-Start) with the first usage message of the month
   that carries the subscriber, at that interval's start (never before the
   month's first second);
2. it is refreshed (Interim-Update) every `interim_s` of journal time, with
   its counters so far; counters are cumulative in the session, as RFC 2866
   asks, so a repeated request changes nothing in `radacct`;
3. it stops (Accounting-Stop) when the month ends (at its last instant,
   Session-Timeout), when the gateway stops (Admin-Reboot) or is found to
   have crashed (NAS-Reboot, at the last interval it journaled), or when the
   gateway ends it (the subscriber removed, or suspended with block, or given
   another User-Name: a session has one User-Name, fixed at its Start).

An interval belongs to the month its end (t1) falls in, t1 on midnight
included, as in the reference collector's report. So every delivered byte
is in exactly one session and the octets of the sessions started in a month
add up to that month's delivered bytes.

The book is a pure function of the journal and the noted gateway events: the
sender may replay any suffix after a crash and produces the same requests
(same Acct-Session-Id, same counters). Acct-Session-Id is a hash of gateway,
journal epoch, subscriber and the seq that opened the session: stable across
restarts, unique across gateways, epochs and months.
"""

from __future__ import annotations

import calendar
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from desanet.errors import ValidationError
from desanet.meter.wire import UsageMessage

# Acct-Terminate-Cause values (dictionary.rfc2866) by why the gateway ends a session.
CAUSE_MONTH_END = "Session-Timeout"
CAUSE_GATEWAY_STOP = "Admin-Reboot"
CAUSE_GATEWAY_CRASH = "NAS-Reboot"
CAUSE_REMOVED = "Admin-Reset"
CAUSE_SUSPENDED = "Port-Suspended"
CAUSE_RENAMED = "Admin-Reset"  # the subscriber's User-Name changed: a new session begins

MARK_ON = "on"  # the gateway started: close what a crash left open, then Accounting-On
MARK_OFF = "off"  # the gateway stops: Stop every session, then Accounting-Off
MARK_END = "end"  # the gateway ended one subscriber's session (removed, suspended)

U32 = 0xFFFFFFFF
USER_NAME_MAX_BYTES = 253  # a RADIUS attribute's value (RFC 2865 section 5)


def check_user_name(text: str) -> str:
    """`text` if it can be a User-Name: printable, no spaces at its ends, 1-253 UTF-8 bytes."""
    size = len(text.encode())
    if not 0 < size <= USER_NAME_MAX_BYTES:
        raise ValidationError(
            f"a RADIUS User-Name is 1 to {USER_NAME_MAX_BYTES} bytes of UTF-8, {size} given"
        )
    if not text.isprintable() or text != text.strip():
        raise ValidationError(
            f"{text!r}: a RADIUS User-Name has no control characters and no spaces at its ends"
        )
    return text


@dataclass(frozen=True)
class SubscriberAttributes:
    """What RADIUS says about a subscriber besides its usage (from the subscribers file)."""

    user_name: str
    framed_ip: str | None = None  # one IPv4 address
    framed_ipv6_prefix: str | None = None  # one IPv6 prefix, "2001:db8:1::/64"
    mac: str | None = None  # Calling-Station-Id


@dataclass(frozen=True)
class Mark:
    """A gateway event placed in the journal's order: it applies after record `after_seq`."""

    id: int
    after_seq: int
    kind: str
    t_ms: int
    sub: str = ""
    cause: str = ""


@dataclass(frozen=True)
class AcctRequest:
    """One Accounting-Request to send: `key` orders it (one outstanding per key).

    `barrier` requests (Accounting-On/Off) go out alone: everything before
    them is acknowledged first, nothing after them is sent before their reply.
    """

    key: str
    event_s: int
    attributes: dict[str, Any]
    barrier: bool = False


@dataclass
class Session:
    """One open accounting session and its cumulative counters."""

    sub: str
    session_id: str
    month: str
    start_s: int
    next_interim_s: int
    up: int = 0
    down: int = 0
    up_pkts: int = 0
    down_pkts: int = 0
    # Fixed at the Start: a session is one User-Name's in radacct from its Start to its Stop.
    user_name: str = ""


def month_of_t1(t1_ms: int) -> str:
    """The UTC month "YYYY-MM" an interval ending at `t1_ms` counts in (midnight: the old one)."""
    return time.strftime("%Y-%m", time.gmtime((t1_ms - 1) / 1000))


def month_start_s(month: str) -> int:
    """Unix seconds of the first instant of a month "YYYY-MM" (UTC)."""
    year, mon = (int(part) for part in month.split("-"))
    return calendar.timegm((year, mon, 1, 0, 0, 0))


def next_month_start_s(month: str) -> int:
    """Unix seconds of the first instant after a month "YYYY-MM" (UTC)."""
    year, mon = (int(part) for part in month.split("-"))
    return calendar.timegm((year + mon // 12, mon % 12 + 1, 1, 0, 0, 0))


def session_id(gateway_id: str, epoch: str, sub: str, seq: int) -> str:
    """The Acct-Session-Id of the session `seq` opened: 16 hex digits, the same on every replay."""
    digest = hashlib.sha256(f"{gateway_id}\n{epoch}\n{sub}\n{seq}".encode()).hexdigest()
    return digest[:16].upper()


@dataclass
class SessionBook:
    """Open sessions and the journal position they are current at (what is persisted)."""

    cursor: int = 0
    marks_done: int = 0
    last_t_ms: int = 0
    sessions: dict[str, Session] = field(default_factory=dict)
    epoch: str = ""  # the journal life the record at `cursor` is of ("": not known yet)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready map of the book."""
        return {
            "v": 1,
            "cursor": self.cursor,
            "epoch": self.epoch,
            "marks_done": self.marks_done,
            "last_t_ms": self.last_t_ms,
            "sessions": [asdict(s) for s in self.sessions.values()],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SessionBook:
        """The book saved by `to_json` (raises KeyError/TypeError when it is not one)."""
        sessions = [Session(**s) for s in doc["sessions"]]
        return cls(
            cursor=int(doc["cursor"]),
            marks_done=int(doc["marks_done"]),
            last_t_ms=int(doc["last_t_ms"]),
            sessions={s.sub: s for s in sessions},
            epoch=str(doc.get("epoch", "")),
        )


class Accountant:
    """Turns journal records and marks into Accounting-Requests, updating a SessionBook."""

    def __init__(
        self,
        gateway_id: str,
        book: SessionBook,
        interim_s: int,
        attributes_of: Callable[[str], SubscriberAttributes | None],
        nas_ip: str,
    ) -> None:
        self.gateway_id = gateway_id
        self.book = book
        self.interim_s = interim_s
        self.attributes_of = attributes_of
        self.nas_ip = nas_ip

    def record(self, seq: int, msg: UsageMessage, epoch: str) -> list[AcctRequest]:
        """The requests one usage message causes (a snapshot carries no usage: none)."""
        book = self.book
        book.last_t_ms = max(book.last_t_ms, msg.t1)
        if msg.snapshot:
            return []
        out: list[AcctRequest] = []
        month = month_of_t1(msg.t1)
        for sub in [s for s, sess in book.sessions.items() if sess.month != month]:
            ended = book.sessions[sub].month
            out.append(self._stop(sub, next_month_start_s(ended), CAUSE_MONTH_END))
        t_s = msg.t1 // 1000
        for row in msg.records():
            sess = book.sessions.get(row.sub)
            if sess is None:
                start_s = max(msg.t0 // 1000, month_start_s(month))
                info = self.attributes_of(row.sub)
                sess = Session(
                    sub=row.sub,
                    session_id=session_id(self.gateway_id, epoch, row.sub, seq),
                    month=month,
                    start_s=start_s,
                    next_interim_s=start_s + self.interim_s,
                    user_name=info.user_name if info else row.sub,
                )
                book.sessions[row.sub] = sess
                out.append(self._request(sess, "Start", start_s))
            sess.up += row.up
            sess.down += row.down
            sess.up_pkts += row.up_pkts
            sess.down_pkts += row.down_pkts
        for sess in book.sessions.values():
            if sess.next_interim_s <= t_s:
                sess.next_interim_s = t_s + self.interim_s
                out.append(self._request(sess, "Interim-Update", t_s))
        return out

    def mark(self, mark: Mark) -> list[AcctRequest]:
        """The requests a gateway event causes."""
        book = self.book
        t_s = mark.t_ms // 1000
        out: list[AcctRequest] = []
        if mark.kind == MARK_END:
            if mark.sub in book.sessions:
                out.append(self._stop(mark.sub, t_s, mark.cause))
        elif mark.kind in (MARK_ON, MARK_OFF):
            # Sessions still open at a start were left by a crash: they end at the last
            # interval the gateway journaled, not at the restart.
            at_s, cause = (
                (book.last_t_ms // 1000, CAUSE_GATEWAY_CRASH)
                if mark.kind == MARK_ON
                else (t_s, CAUSE_GATEWAY_STOP)
            )
            for sub, sess in list(book.sessions.items()):
                out.append(self._stop(sub, max(at_s, sess.start_s), cause))
            status = "Accounting-On" if mark.kind == MARK_ON else "Accounting-Off"
            attrs: dict[str, Any] = {
                "Acct-Status-Type": status,
                "Acct-Session-Id": session_id(self.gateway_id, mark.kind, "", mark.id),
                "NAS-Identifier": self.gateway_id,
                "NAS-IP-Address": self.nas_ip,
                "Event-Timestamp": t_s,
            }
            out.append(AcctRequest("", t_s, attrs, barrier=True))
        book.last_t_ms = max(book.last_t_ms, mark.t_ms)
        return out

    def _stop(self, sub: str, at_s: int, cause: str) -> AcctRequest:
        sess = self.book.sessions.pop(sub)
        request = self._request(sess, "Stop", at_s)
        request.attributes["Acct-Terminate-Cause"] = cause
        return request

    def _request(self, sess: Session, status: str, at_s: int) -> AcctRequest:
        info = self.attributes_of(sess.sub)
        attrs: dict[str, Any] = {
            "Acct-Status-Type": status,
            # A book saved before sessions kept their name: the subscriber's name now.
            "User-Name": sess.user_name or (info.user_name if info else sess.sub),
            "Acct-Session-Id": sess.session_id,
            "NAS-Identifier": self.gateway_id,
            "NAS-IP-Address": self.nas_ip,
            "Event-Timestamp": at_s,
        }
        if status != "Start":
            # Input is what the NAS received from the user: the subscriber's upload.
            attrs.update(
                {
                    "Acct-Session-Time": max(0, at_s - sess.start_s),
                    "Acct-Input-Octets": sess.up & U32,
                    "Acct-Input-Gigawords": sess.up >> 32,
                    "Acct-Output-Octets": sess.down & U32,
                    "Acct-Output-Gigawords": sess.down >> 32,
                    "Acct-Input-Packets": sess.up_pkts & U32,
                    "Acct-Output-Packets": sess.down_pkts & U32,
                }
            )
        if info is not None:
            if info.framed_ip:
                attrs["Framed-IP-Address"] = info.framed_ip
            if info.framed_ipv6_prefix:
                attrs["Framed-IPv6-Prefix"] = info.framed_ipv6_prefix
            if info.mac:
                attrs["Calling-Station-Id"] = info.mac
        return AcctRequest(sess.sub, at_s, attrs)
