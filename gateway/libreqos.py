"""Import LibreQoS's ShapedDevices.csv (and optionally network.json) as a subscribers file.

One subscriber per Circuit ID: the IPv4/IPv6 cells (quoted, comma-separated
lists of addresses or CIDRs) and MACs of all the circuit's devices are
merged; Mbps (fractions allowed) become tc-style kbit rates. Columns are
found by their header names, so the published header and the newer ones
(with `Parent Node ID`, `Anchor Node ID`, `sqm`) all read. Every problem is
collected with its line (duplicate or overlapping addresses, min > max,
circuits without addresses, rates that differ between a circuit's devices,
parent nodes missing from network.json) and nothing is written when there
is any.

desanet shapes one flat tree with one leaf qdisc kind for everyone: the
`sqm` column maps to a suggested `[shaping] leaf`, and network.json's
parent-node limits are checked for names only, not applied.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from desanet.durable import replace_atomically
from desanet.ebpf.abi import PREFIXES_PER_SUBSCRIBER
from desanet.errors import ConfigError
from desanet.gateway.registry import COLUMNS
from desanet.validate import SUBSCRIBER_ID_RE

REQUIRED = (
    "Circuit ID",
    "Circuit Name",
    "MAC",
    "IPv4",
    "IPv6",
    "Download Min Mbps",
    "Upload Min Mbps",
    "Download Max Mbps",
    "Upload Max Mbps",
)
RATES = (
    ("down_min", "Download Min Mbps"),
    ("down_max", "Download Max Mbps"),
    ("up_min", "Upload Min Mbps"),
    ("up_max", "Upload Max Mbps"),
)
# LibreQoS sqm values -> desanet leaf qdiscs ("none" is no AQM: a plain FIFO).
SQM_LEAF = {"cake": "cake", "fq_codel": "fq_codel", "none": "pfifo"}
_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Circuit:
    """One LibreQoS circuit: the devices' merged addresses and MACs, and its rates."""

    id: str
    name: str
    line: int
    rates_mbps: tuple[float, float, float, float]
    prefixes: list[str] = field(default_factory=list)
    prefix_lines: list[int] = field(default_factory=list)
    macs: list[str] = field(default_factory=list)
    leaves: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Imported:
    """The result of an import: circuits in file order and the leaf their sqm suggests."""

    circuits: list[Circuit]
    leaf: str | None
    notes: list[str]


def _kbit(mbps: float) -> str:
    return f"{round(mbps * 1000)}kbit"


def _cells(text: str) -> list[str]:
    return [c.strip() for c in text.replace(";", ",").split(",") if c.strip()]


def read_shaped_devices(text: str, path: Path, network: set[str] | None = None) -> Imported:
    """Check and merge ShapedDevices.csv text; raises ConfigError listing every problem."""
    rows = list(csv.reader(text.splitlines()))
    problems: list[str] = []
    if not rows:
        raise ConfigError(f"{path}: empty file, expected LibreQoS's ShapedDevices.csv header")
    header = [c.strip() for c in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ConfigError(f"{path}:1: not a ShapedDevices.csv header: missing {', '.join(missing)}")
    col = {name: header.index(name) for name in header}
    circuits: dict[str, Circuit] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        cell = {name: row[index].strip() for name, index in col.items()}
        problems.extend(_device(cell, number, path, circuits, network))
    if not circuits and not problems:
        problems.append(f"{path}: no devices")
    for circuit in circuits.values():
        if not circuit.prefixes:
            problems.append(f"{path}:{circuit.line}: circuit {circuit.id}: no IPv4 or IPv6 address")
        if len(circuit.prefixes) > PREFIXES_PER_SUBSCRIBER:
            problems.append(
                f"{path}:{circuit.line}: circuit {circuit.id}: {len(circuit.prefixes)} addresses, "
                f"desanet takes at most {PREFIXES_PER_SUBSCRIBER} per subscriber (use CIDRs)"
            )
    problems.extend(_overlaps(circuits.values(), path))
    if problems:
        listing = "\n".join(problems)
        raise ConfigError(f"{path}: {len(problems)} problem(s), nothing written:\n{listing}")
    leaves = set().union(*(c.leaves for c in circuits.values()))
    notes = []
    leaf = None
    if len(leaves) == 1:
        leaf = leaves.pop()
    elif leaves:
        notes.append(
            f"circuits ask for different sqm ({', '.join(sorted(leaves))}): desanet uses one "
            "[shaping] leaf for every subscriber; choose one"
        )
    return Imported(list(circuits.values()), leaf, notes)


def _device(
    cell: dict[str, str],
    number: int,
    path: Path,
    circuits: dict[str, Circuit],
    network: set[str] | None,
) -> list[str]:
    where = f"{path}:{number}"
    problems: list[str] = []
    circuit_id = cell["Circuit ID"]
    if not SUBSCRIBER_ID_RE.match(circuit_id):
        return [
            f"{where}: Circuit ID {circuit_id!r} is not a subscriber id (letters, digits, "
            "'_', '.', '-'; at most 64)"
        ]
    rates: list[float] = []
    for _key, column in RATES:
        try:
            value = float(cell[column])
        except ValueError:
            problems.append(f"{where}: {column} {cell[column]!r} is not a number of Mbps")
            continue
        if not value > 0:
            problems.append(f"{where}: {column} must be above 0 Mbps")
        rates.append(value)
    if len(rates) == 4:
        pairs = (("Download", rates[0], rates[1]), ("Upload", rates[2], rates[3]))
        for direction, low, high in pairs:
            if low > high:
                problems.append(f"{where}: {direction} Min Mbps {low:g} is above Max {high:g}")
    parent = cell.get("Parent Node", "")
    if network is not None and parent and parent not in network:
        problems.append(f"{where}: Parent Node {parent!r} is not in network.json")
    circuit = circuits.get(circuit_id)
    if circuit is None:
        r = (rates + [0.0] * 4)[:4]
        circuit = Circuit(circuit_id, cell["Circuit Name"], number, (r[0], r[1], r[2], r[3]))
        circuits[circuit_id] = circuit
    elif len(rates) == 4 and tuple(rates) != circuit.rates_mbps:
        problems.append(
            f"{where}: circuit {circuit_id}: rates differ from its device on line {circuit.line}"
        )
    for column in ("IPv4", "IPv6"):
        for text in _cells(cell[column]):
            try:
                net = ipaddress.ip_network(text, strict=True)
            except ValueError as err:
                problems.append(f"{where}: {column} {text!r}: {err}")
                continue
            if (net.version == 4) != (column == "IPv4"):
                problems.append(f"{where}: {column} {text!r} is an IPv{net.version} address")
                continue
            circuit.prefixes.append(text)
            circuit.prefix_lines.append(number)
    for mac in _cells(cell["MAC"]):
        if not _MAC.match(mac):
            problems.append(f"{where}: MAC {mac!r} is not six hex octets")
        elif mac.lower().replace("-", ":") not in circuit.macs:
            circuit.macs.append(mac.lower().replace("-", ":"))
    sqm = cell.get("sqm", "").lower()
    for part in filter(None, sqm.replace("/", " ").split()):
        if part in SQM_LEAF:
            circuit.leaves.add(SQM_LEAF[part])
        elif part not in ("diffserv3", "diffserv4", "besteffort"):
            problems.append(f"{where}: sqm {sqm!r}: desanet supports cake, fq_codel or none")
    return problems


def _overlaps(circuits: Iterable[Circuit], path: Path) -> list[str]:
    entries = sorted(
        (
            (net.version, int(net.network_address), int(net.broadcast_address), c, p, line)
            for c in circuits
            for p, line in zip(c.prefixes, c.prefix_lines, strict=True)
            for net in (ipaddress.ip_network(p),)
        ),
        key=lambda e: (e[0], e[1], -e[2]),
    )
    problems = []
    widest = None
    for entry in entries:
        version, start, end, circuit, prefix, line = entry
        if widest is not None and widest[0] == version and start <= widest[2]:
            other = widest[3]
            owner = "itself" if other.id == circuit.id else f"circuit {other.id}"
            problems.append(
                f"{path}:{line}: circuit {circuit.id}: {prefix} overlaps {widest[4]} of {owner} "
                f"(line {widest[5]})"
            )
        if widest is None or widest[0] != version or end > widest[2]:
            widest = entry
    return problems


def read_network_nodes(path: Path) -> set[str]:
    """Every node name in LibreQoS's network.json (a tree of nodes with `children`)."""
    try:
        doc = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    except ValueError as err:
        raise ConfigError(f"{path}: not JSON: {err}") from err
    names: set[str] = set()

    def walk(nodes: object) -> None:
        if not isinstance(nodes, dict):
            raise ConfigError(f"{path}: a node's children must be a JSON object of nodes")
        for name, node in nodes.items():
            names.add(str(name))
            if isinstance(node, dict) and "children" in node:
                walk(node["children"])

    walk(doc)
    return names


def render_subscribers(circuits: Sequence[Circuit], with_mac: bool) -> str:
    """The subscribers CSV text (header as registry.COLUMNS, plus `mac` when asked)."""
    lines: list[list[str]] = [[*COLUMNS, *(["mac"] if with_mac else [])]]
    for c in circuits:
        down_min, down_max, up_min, up_max = c.rates_mbps
        row = [
            c.id,
            c.name,
            " ".join(c.prefixes),
            _kbit(down_min),
            _kbit(down_max),
            _kbit(up_min),
            _kbit(up_max),
            "",
        ]
        lines.append(row + ([" ".join(c.macs)] if with_mac else []))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(lines)
    return out.getvalue()


def import_libreqos(
    devices: Path, output: Path, network: Path | None = None, with_mac: bool = False
) -> Imported:
    """Read, check and write: `output` is replaced only when the whole import is valid."""
    try:
        text = devices.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ConfigError(f"{devices}: cannot read: {err.strerror}") from err
    nodes = read_network_nodes(network) if network is not None else None
    imported = read_shaped_devices(text, devices, nodes)
    replace_atomically(output, render_subscribers(imported.circuits, with_mac).encode(), mode=0o644)
    return imported
