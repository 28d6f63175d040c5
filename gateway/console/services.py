"""What the console does, for the routes to call: read the gateway, act on it, audit every action.

Routes stay thin: each one calls one function here and renders the result.
Every action names the user who asked for it and lands in the audit log,
whether the gateway accepted it or not.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from desanet.errors import ControlError, DesanetError
from desanet.gateway.console.control_link import ControlLink
from desanet.gateway.console.history import UsageHistory
from desanet.gateway.console.status_source import StatusSource
from desanet.gateway.console.subscribers_file import Changed, Entry, Refused, SubscribersFile
from desanet.gateway.console.users import User, UserStore
from desanet.gateway.registry import Subscriber

# Control operations an operator may send, with the arguments the form gives.
OPERATOR_OPS = ("plan", "plan_reset", "suspend", "resume", "quota_reset")


@dataclass(frozen=True)
class Outcome:
    """What became of an action: accepted, or refused with the reason (and the field at fault)."""

    ok: bool
    error: str = ""
    column: str = ""
    changed_meanwhile: bool = False


class FileIndex:
    """The subscribers file parsed once per version (pages ask for it often)."""

    def __init__(self, file: SubscribersFile) -> None:
        self.file = file
        self._lock = threading.Lock()
        self._key: tuple[int, int] | None = None
        self._subs: dict[str, Subscriber] = {}
        self._error = ""

    def read(self) -> tuple[dict[str, Subscriber], str]:
        """Subscribers by id as the file holds them now, and the file's error if it has one."""
        try:
            st = self.file.path.stat()
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        with self._lock:
            if key != self._key or key is None:
                try:
                    self._subs = {s.id: s for s in self.file.subscribers()}
                    self._error = ""
                except DesanetError as err:
                    self._subs, self._error = {}, str(err)
                self._key = key
            return self._subs, self._error


@dataclass
class Console:
    """The console's collaborators: the gateway's four interfaces and the users."""

    status: StatusSource
    control: ControlLink
    file: SubscribersFile
    history: UsageHistory
    users: UserStore

    def __post_init__(self) -> None:
        self.index = FileIndex(self.file)

    # -- control actions ----------------------------------------------------------------------

    def act(self, user: User, op: str, sub_id: str, args: Mapping[str, Any]) -> Outcome:
        """Send one control request on `user`'s behalf; audited either way."""
        if op not in OPERATOR_OPS:
            return self._audit(user, op, sub_id, dict(args), Outcome(False, f"unknown action {op}"))
        try:
            reply = self.control.send(op, sub_id, **args)
        except ControlError as err:
            return self._audit(user, op, sub_id, dict(args), Outcome(False, str(err)))
        if not reply.get("ok"):
            return self._audit(
                user, op, sub_id, dict(args), Outcome(False, str(reply.get("error")))
            )
        self._audit(user, op, sub_id, dict(args), Outcome(True))
        if isinstance(reply.get("state"), str):
            self.status.wait_for_state(sub_id, reply["state"])
        return Outcome(True)

    # -- subscribers file ---------------------------------------------------------------------

    def add(self, user: User, entry: Entry, version: str) -> Outcome:
        """Add a subscriber to the file (nothing written when the file would be refused)."""
        return self._edit(user, "add", entry.id, entry, lambda: self.file.add(entry, version))

    def update(self, user: User, sub_id: str, entry: Entry, version: str) -> Outcome:
        """Change a subscriber's line of the file."""
        return self._edit(
            user, "edit", sub_id, entry, lambda: self.file.update(sub_id, entry, version)
        )

    def remove(self, user: User, sub_id: str, version: str) -> Outcome:
        """Remove a subscriber from the file."""
        return self._edit(user, "remove", sub_id, None, lambda: self.file.remove(sub_id, version))

    def _edit(
        self, user: User, action: str, target: str, entry: Entry | None, apply: Any
    ) -> Outcome:
        detail = asdict(entry) if entry is not None else {}
        try:
            apply()
        except Refused as err:
            return self._audit(
                user, action, target, detail, Outcome(False, err.message, err.column)
            )
        except Changed as err:
            return self._audit(
                user, action, target, detail, Outcome(False, str(err), changed_meanwhile=True)
            )
        except DesanetError as err:
            return self._audit(user, action, target, detail, Outcome(False, str(err)))
        return self._audit(user, action, target, detail, Outcome(True))

    def _audit(
        self, user: User, action: str, target: str, detail: Mapping[str, Any], outcome: Outcome
    ) -> Outcome:
        text = " ".join(f"{k}={v}" for k, v in detail.items() if v not in ("", None))
        if not outcome.ok:
            text = f"{text} refused: {outcome.error}".strip()
        self.users.audit(user.name, action, target, text, outcome.ok)
        return outcome
