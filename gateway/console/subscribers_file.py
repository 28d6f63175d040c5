"""The subscribers file as the console edits it: one line per change, checked in full, replaced
whole.

Every edit builds the new file text, checks it with the registry's own
parser (the same rules `desanet run` applies), and only then replaces the
file atomically; the service notices the new file and reloads it. Lines the
console did not touch (comments, other subscribers) are kept byte for byte.
An edit names the version (a hash) of the file it was made against, so a
change made meanwhile by someone else is never overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import threading
from dataclasses import astuple, dataclass
from pathlib import Path

from desanet.durable import replace_atomically
from desanet.errors import ConfigError, DesanetError
from desanet.gateway.config import LinkConfig
from desanet.gateway.registry import COLUMNS, Subscriber, parse_subscribers

# After the path, the registry's errors read "[:<line>]: <column>: <message>".
_LOCATED = re.compile(r"^(?::\d+)?: (?P<column>[a-z_]+): ", re.S)


@dataclass(frozen=True)
class Entry:
    """One subscriber's cells exactly as the file holds them."""

    id: str
    name: str
    prefixes: str
    down_min: str
    down_max: str
    up_min: str
    up_max: str
    quota: str


class Refused(DesanetError):
    """The edited file would not pass the registry's check; `column` names the field at fault."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


class Changed(DesanetError):
    """The file changed since the form was opened; nothing was written."""


def version_of(text: str) -> str:
    """The version an edit is made against: a hash of the file's text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cells(line: str) -> list[str]:
    return next(csv.reader([line]), [])


def _line(entry: Entry, optional: list[str]) -> str:
    """The file's line for `entry`; `optional` are its cells of the file's optional columns."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([*astuple(entry), *optional])
    return out.getvalue()


def _optional_columns(lines: list[str]) -> int:
    """How many optional columns (mac, radius_user) the file's header has."""
    return max(0, len(_cells(lines[0])) - len(COLUMNS)) if lines else 0


class SubscribersFile:
    """The file `[subscribers] file` names, checked against the link and the datapath capacity."""

    def __init__(self, path: Path, link: LinkConfig, capacity: int) -> None:
        self.path = path
        self.link = link
        self.capacity = capacity
        self._lock = threading.Lock()

    def text(self) -> str:
        """The file as it is now."""
        try:
            return self.path.read_text()
        except OSError as err:
            raise ConfigError(f"{self.path}: cannot read the subscribers file: {err}") from err

    def version(self) -> str:
        """The current version, for an edit form to carry."""
        return version_of(self.text())

    def subscribers(self) -> list[Subscriber]:
        """The subscribers as the registry reads the file now."""
        return parse_subscribers(self.text(), self.path, self.link, self.capacity)

    def entry(self, sub_id: str) -> Entry | None:
        """A subscriber's cells as written in the file, or None."""
        for line in self.text().splitlines()[1:]:
            cells = [c.strip() for c in _cells(line)]
            if len(cells) >= len(COLUMNS) and cells[0] == sub_id:
                return Entry(*cells[: len(COLUMNS)])
        return None

    def add(self, entry: Entry, version: str) -> None:
        """Append a subscriber; raises Refused (nothing written) when the file would be invalid."""
        self._edit(version, None, entry)

    def update(self, sub_id: str, entry: Entry, version: str) -> None:
        """Replace subscriber `sub_id`'s line with `entry` (its id may change)."""
        self._edit(version, sub_id, entry)

    def remove(self, sub_id: str, version: str) -> None:
        """Delete subscriber `sub_id`'s line."""
        self._edit(version, sub_id, None)

    def _edit(self, version: str, sub_id: str | None, entry: Entry | None) -> None:
        with self._lock:
            text = self.text()
            if version_of(text) != version:
                raise Changed(f"{self.path} changed since the form was opened")
            lines = text.splitlines()
            new_lines = list(lines)
            # The form edits the first columns; a MAC binding or a RADIUS name stays as the
            # file has it.
            optional = _optional_columns(lines)
            if sub_id is not None:
                index = next(
                    (
                        i
                        for i, line in enumerate(lines[1:], start=1)
                        if (_cells(line) or [""])[0].strip() == sub_id
                    ),
                    None,
                )
                if index is None:
                    raise Refused("id", f"subscriber {sub_id} is not in {self.path}")
                if entry is None:
                    del new_lines[index]
                else:
                    kept = [c.strip() for c in _cells(lines[index])[len(COLUMNS) :]]
                    new_lines[index] = _line(entry, (kept + [""] * optional)[:optional])
            elif entry is not None:
                new_lines.append(_line(entry, [""] * optional))
            new_text = "\n".join(new_lines) + "\n"
            try:
                parse_subscribers(new_text, self.path, self.link, self.capacity)
            except ConfigError as err:
                located = str(err).removeprefix(str(self.path))
                match = _LOCATED.match(located)
                column = match.group("column") if match else ""
                # The form shows the reason beside the field: the file and line mean nothing there.
                reason = located[match.end() :] if match else str(err)
                raise Refused(column if column in COLUMNS else "", reason) from err
            # Keep the file's mode: the operator chose who may read the subscribers' addresses.
            mode = self.path.stat().st_mode & 0o777
            replace_atomically(self.path, new_text.encode(), mode=mode)
