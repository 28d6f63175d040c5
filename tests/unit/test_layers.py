"""The layers of the installed package: every import points down and no two packages cycle.

desanet's own modules (desanet/*.py) are the bottom; ebpf and cython_ext stand on
it; meter and shaper on those; gateway, the composition root, on all of them;
benchmarks on top. The source is read with `ast` (Cython's by its import
lines), so nothing is imported to check it; each violation is reported as
file:line.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
BOTTOM = "desanet"  # the modules directly in desanet/
# What each package may import besides itself. ebpf and cython_ext sit side by side and
# need nothing of each other; so do meter and shaper. Nothing below gateway imports it.
ALLOWED: dict[str, frozenset[str]] = {
    BOTTOM: frozenset(),
    "ebpf": frozenset({BOTTOM}),
    "cython_ext": frozenset({BOTTOM}),
    "meter": frozenset({BOTTOM, "ebpf", "cython_ext"}),
    "shaper": frozenset({BOTTOM, "ebpf", "cython_ext"}),
    "gateway": frozenset({BOTTOM, "ebpf", "cython_ext", "meter", "shaper"}),
    "benchmarks": frozenset({BOTTOM, "ebpf", "cython_ext", "meter", "shaper", "gateway"}),
}
LINKED = tuple(p for p in ALLOWED if p != BOTTOM)  # top-level folders linked into desanet/
TESTS = "tests"  # in the checkout only: the wheel does not ship it
SOURCE_SUFFIXES = (".py", ".pyi", ".pyx")

# Module names written in strings: `python -m benchmarks.x`, `-c "from meter.y import z"`.
_BARE = "|".join((*LINKED, TESTS))
BARE_IN_TEXT = re.compile(rf"(?:\bfrom|\bimport|(?<!\w)-m)\s+((?:{_BARE})(?:\.\w+)+)")
PYX_IMPORT = re.compile(r"^(\s*)(?:import\s|from\s+\S+\s+import\s)")


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is, and whether it runs only inside a function."""

    where: str  # file:line, the file relative to the repository
    target: str  # the dotted module name, relative imports resolved
    in_function: bool


@dataclass(frozen=True)
class Module:
    """A source file of the installed package: its package (layer), its dotted name, its path."""

    package: str
    name: str
    path: Path

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(REPO))


def modules() -> list[Module]:
    """Every source file of the installed package, bottom first."""
    found = [
        Module(BOTTOM, _dotted(("desanet", *_parts(p.relative_to(REPO / "desanet")))), p)
        for p in sorted((REPO / "desanet").iterdir())
        if p.is_file() and p.suffix in SOURCE_SUFFIXES
    ]
    for package in LINKED:
        root = REPO / package
        for path in sorted(root.rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                name = _dotted(("desanet", package, *_parts(path.relative_to(root))))
                found.append(Module(package, name, path))
    return found


def _parts(rel: Path) -> tuple[str, ...]:
    return (*rel.parent.parts, rel.name.split(".")[0])


def _dotted(parts: tuple[str, ...]) -> str:
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


KNOWN = {m.name for m in modules()}


def imports(module: Module) -> Iterator[Import]:
    """The project-relevant imports of one file (every import; callers filter)."""
    text = module.path.read_text()
    if module.path.suffix == ".pyx":
        yield from _pyx_imports(module, text)
        return
    yield from _ImportFinder(module).run(ast.parse(text, str(module.path)))


def _pyx_imports(module: Module, text: str) -> Iterator[Import]:
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        match = PYX_IMPORT.match(line)
        if match is None:
            continue
        statement, end = line.strip(), number
        while statement.count("(") > statement.count(")"):
            statement += " " + lines[end].strip()
            end += 1
        finder = _ImportFinder(module, line_offset=number - 1, indented=bool(match.group(1)))
        yield from finder.run(ast.parse(statement))


class _ImportFinder(ast.NodeVisitor):
    def __init__(self, module: Module, line_offset: int = 0, indented: bool = False) -> None:
        self.module = module
        self.line_offset = line_offset
        self.depth = 1 if indented else 0
        self.found: list[Import] = []

    def run(self, tree: ast.AST) -> list[Import]:
        self.visit(tree)
        return self.found

    def _add(self, node: ast.stmt, target: str) -> None:
        where = f"{self.module.rel}:{node.lineno + self.line_offset}"
        self.found.append(Import(where, target, self.depth > 0))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.name.split(".")
            if not self.module.path.name.startswith("__init__."):
                package = package[:-1]
            anchor = package[: len(package) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(node, submodule if submodule in KNOWN else base)


def package_of(target: str) -> str | None:
    """The layer an installed-name import lands in; None outside the project or bare."""
    parts = target.split(".")
    if parts[0] != "desanet":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LINKED else BOTTOM


def is_bare(target: str) -> bool:
    """A project import without the `desanet.` prefix: it works only from a checkout's root."""
    return target.split(".")[0] in (*LINKED, TESTS)


def test_every_folder_is_a_layer_linked_into_desanet_and_packaged() -> None:
    folders = {
        p.name
        for p in REPO.iterdir()
        if (p / "__init__.py").is_file() and not p.is_symlink() and p.name not in (TESTS, BOTTOM)
    }
    assert folders == set(LINKED), "give every package a layer in ALLOWED"
    for package in LINKED:
        link = REPO / "desanet" / package
        assert link.is_symlink() and link.resolve() == REPO / package, link
    setup = ast.parse((REPO / "setup.py").read_text())
    layers = next(
        ast.literal_eval(node.value)
        for node in setup.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "LAYERS" for t in node.targets)
    )
    assert set(layers) == set(LINKED)


def test_the_checker_sees_every_kind_of_import() -> None:
    # The rules below are only as good as this reading of the source: pin it on known files.
    found = {
        m.name: {i.target for i in imports(m)}
        for m in modules()
        if m.name in ("desanet.gateway.cli", "desanet.cython_ext._aggregate")
    }
    assert "desanet.gateway.datapath_commands" in found["desanet.gateway.cli"]
    assert "desanet.cython_ext._state" in found["desanet.cython_ext._aggregate"]  # from .pyx
    assert package_of("desanet.errors") == BOTTOM
    assert package_of("desanet.meter.poll") == "meter"
    assert package_of("numpy") is None
    assert is_bare("meter.poll") and is_bare("tests.vm") and not is_bare("desanet.meter")
    harness = [
        i for m in modules() if m.name == "desanet.benchmarks.bufferbloat" for i in imports(m)
    ]
    assert any(i.target.startswith("tests.vm") and i.in_function for i in harness)
    assert all(i.in_function for i in harness if i.target.startswith(TESTS))
    assert find_cycles({"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3"}}) == [
        "a -> b -> c -> a (a.py:1, b.py:2, c.py:3)"
    ]
    assert find_cycles({"a": {"b": "a.py:1"}, "b": {}, "c": {"a": "c.py:3"}}) == []


def test_imports_point_down() -> None:
    violations = []
    for module in modules():
        allowed = ALLOWED[module.package] | {module.package}
        for imp in imports(module):
            target = package_of(imp.target)
            if target is not None and target not in allowed:
                may = ", ".join(sorted("desanet/*.py" if p == BOTTOM else p for p in allowed))
                violations.append(
                    f"{imp.where}: {module.package} imports {imp.target} ({target}); "
                    f"{module.package} may import only {may}"
                )
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_project_imports_carry_the_installed_name() -> None:
    violations = []
    for module in modules():
        for imp in imports(module):
            if not is_bare(imp.target):
                continue
            head = imp.target.split(".")[0]
            # The benchmark that boots the VM uses the checkout's VM harness (tests/vm),
            # imported inside a function so the installed module loads without it.
            if head == TESTS and module.package == "benchmarks" and imp.in_function:
                continue
            fix = "import it inside a function" if head == TESTS else f"use desanet.{imp.target}"
            violations.append(f"{imp.where}: bare import {imp.target}: {fix}")
        if module.path.suffix == ".pyx":
            continue
        for node in ast.walk(ast.parse(module.path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for hit in BARE_IN_TEXT.finditer(node.value):
                    line = node.lineno + node.value.count("\n", 0, hit.start())
                    violations.append(
                        f"{module.rel}:{line}: bare module name {hit.group(1)} in a string: "
                        f"use desanet.{hit.group(1)}"
                    )
    assert not violations, "project imports without `desanet.`:\n" + "\n".join(violations)


def find_cycles(edges: dict[str, dict[str, str]]) -> list[str]:
    """Every cycle of a package graph (package -> imported package -> where), once each."""
    cycles = []
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, {})):
                if nxt == start:
                    hops = [*path, start]
                    where = [edges[a][b] for a, b in itertools.pairwise(hops)]
                    cycles.append(" -> ".join(hops) + f" ({', '.join(where)})")
                elif nxt not in path and nxt > start:  # report a cycle from its least member
                    stack.append((nxt, [*path, nxt]))
    return cycles


def test_no_import_cycle_between_packages() -> None:
    edges: dict[str, dict[str, str]] = {p: {} for p in ALLOWED}
    for module in modules():
        for imp in imports(module):
            target = package_of(imp.target)
            if target is not None and target != module.package:
                edges[module.package].setdefault(target, imp.where)
    cycles = find_cycles(edges)
    assert not cycles, "package import cycles:\n" + "\n".join(cycles)
