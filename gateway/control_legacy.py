"""The control journal of earlier versions (`control.journal`), read once to migrate it.

Lines were `<crc32 hex> <json>`: a snapshot record, then one `set` record per
change. Only a torn last line (a crash mid-write, never acknowledged to
billing) is dropped; a bad line with records after it is damage and stops the
service, like damage to the SQLite state that replaces this file.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from desanet.errors import StateError
from desanet.gateway.control_record import SubscriberControl, check_record, damaged
from desanet.gateway.registry import RatePlan

log = logging.getLogger(__name__)

_UNSET = -1  # the old quota_override value meaning "use the subscribers file"


def read_legacy_journal(path: Path) -> dict[str, SubscriberControl]:
    """Every subscriber's record in an old control journal; raises StateError on damage."""
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except OSError as err:
        raise StateError(f"{path}: cannot read the old control journal: {err.strerror}") from err
    docs: dict[str, dict[str, Any]] = {}
    for number, raw in enumerate(lines, start=1):
        record = _decode(raw)
        if record is None:
            if number == len(lines):
                log.warning("%s:%d: dropped a torn last record (a crash mid-write)", path, number)
                break
            raise damaged(path, f"line {number} of {len(lines)} fails its checksum")
        try:
            _apply(docs, record)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise damaged(path, f"line {number}: unexpected record ({err})") from err
    records = {}
    for sub_id, doc in docs.items():
        try:
            records[sub_id] = _record(doc)
            check_record(sub_id, records[sub_id])
        except (StateError, TypeError, ValueError) as err:
            raise damaged(path, f"subscriber {sub_id!r}: {err}") from err
    return records


def _decode(raw: bytes) -> dict[str, Any] | None:
    if not raw.endswith(b"\n") or len(raw) < 10 or raw[8:9] != b" ":
        return None
    body = raw[9:-1]
    try:
        if int(raw[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _apply(docs: dict[str, dict[str, Any]], record: Mapping[str, Any]) -> None:
    if record.get("kind") == "snapshot":
        docs.clear()
        docs.update({k: dict(v) for k, v in record["subs"].items()})
        return
    docs.setdefault(record["sub"], {}).update(record["set"])


def _record(doc: Mapping[str, Any]) -> SubscriberControl:
    plan = doc.get("plan")
    override = doc.get("quota_override", _UNSET)
    return SubscriberControl(
        plan=RatePlan(**plan) if plan else None,
        suspended=doc.get("suspended"),
        quota_overridden=override != _UNSET,
        quota_bytes=None if override == _UNSET else override,
        period=str(doc.get("period", "")),
        period_base=int(doc.get("period_base", 0)),
        throttled=bool(doc.get("throttled", False)),
    )
