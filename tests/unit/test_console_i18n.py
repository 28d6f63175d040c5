"""The console's catalogs are complete: every string in the code and templates is translated."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po

import desanet.gateway.console as console_pkg
from tests.unit.console_helpers import (
    HTTPS,
    ConsoleUnderTest,
    RecordingEndpoint,
    build,
    login,
    serve_control,
)

pytestmark = pytest.mark.unit

PACKAGE = Path(console_pkg.__file__).parent
CATALOG = PACKAGE / "translations" / "id" / "LC_MESSAGES"
KEYWORDS = {"_": None, "gettext": None, "lazy_gettext": None, "_l": None}
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def source_messages() -> set[str]:
    method_map = [("**.py", "python"), ("templates/**.html", "jinja2")]
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
        PACKAGE, method_map, keywords=KEYWORDS
    ):
        found.add(message if isinstance(message, str) else message[0])
    return found


def test_every_string_has_an_indonesian_translation() -> None:
    with open(CATALOG / "messages.po", "rb") as f:
        catalog = read_po(f)
    wanted = source_messages()
    assert len(wanted) > 100
    entries = {m.id: m for m in catalog if m.id}
    missing = sorted(wanted - entries.keys())
    assert not missing, f"not in the catalog (pybabel extract + update): {missing}"
    stale = sorted(entries.keys() - wanted)
    assert not stale, f"in the catalog but no longer in the code: {stale}"
    untranslated = sorted(i for i, m in entries.items() if not m.string or m.fuzzy)
    assert not untranslated, f"untranslated or fuzzy: {untranslated}"
    for msgid, message in entries.items():
        assert set(_PLACEHOLDER.findall(str(msgid))) == set(
            _PLACEHOLDER.findall(str(message.string))
        ), msgid


def test_the_compiled_catalog_matches_the_po_file() -> None:
    with open(CATALOG / "messages.po", "rb") as f:
        po = {m.id: m.string for m in read_po(f) if m.id}
    mo_path = CATALOG / "messages.mo"
    assert mo_path.exists(), "messages.mo missing: run `make build` (pybabel compile)"
    with open(mo_path, "rb") as f:
        mo = {m.id: m.string for m in read_mo(f) if m.id}
    assert mo == po, "messages.mo is older than messages.po: run `make build`"


@pytest.fixture
def control() -> Iterator[RecordingEndpoint]:
    yield from serve_control()


def test_indonesian_pages_show_no_english_catalog_string(
    tmp_path: Path, control: RecordingEndpoint
) -> None:
    cut: ConsoleUnderTest = build(tmp_path, control)
    cut.add_user("alice", "admin")
    with open(CATALOG / "messages.po", "rb") as f:
        english = [
            str(m.id)
            for m in read_po(f)
            if m.id and m.string != m.id and "%(" not in m.id and len(m.id) > 3
        ]
    client = cut.client()
    client.environ_base["HTTP_ACCEPT_LANGUAGE"] = "id-ID,id;q=0.9"
    login(client, "alice")
    for path in ("/", "/subscribers", "/subscribers/s1", "/subscribers/new", "/admin/users"):
        html = client.get(path, base_url=HTTPS).get_data(as_text=True)
        text = re.sub(r"<[^>]+>", " ", html)
        leaked = [m for m in english if re.search(rf"(?<![\w-]){re.escape(m)}(?![\w-])", text)]
        assert not leaked, (path, leaked)
