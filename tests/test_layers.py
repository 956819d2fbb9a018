"""The layers of src/nsbuild import downward only, and no package has a cycle.

Every import counts, at the top of a module or inside a function: a lazy
import is still a dependency of the layer that makes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import its own package and the ones before it.
LAYERS = (
    ("nsbuild", "nsbuild.printable", "nsbuild.errors", "nsbuild.userfile"),
    ("nsbuild.sandbox",),
    ("nsbuild.net",),
    ("nsbuild.envs",),
    ("nsbuild.backends",),
    ("nsbuild.debbuild",),
    ("nsbuild.virtserver",),
    # The farm sits beside the command line: it runs `nsbuild build` as a
    # command, and neither imports the other (test below).
    ("nsbuild.cli", "nsbuild.__main__", "nsbuild.farm"),
)


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The nsbuild modules `name` imports (a package's `from p import m`
    counts as the module m when m is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def layer_of(module: str) -> int:
    for rank in range(len(LAYERS) - 1, -1, -1):
        if any(module == top or module.startswith(top + ".") for top in LAYERS[rank]):
            if rank or module in LAYERS[0]:
                return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_import_goes_down_or_stays_in_its_layer() -> None:
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in sorted(graph().items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def _cycle_from(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start, if there is one (depth first)."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_imports_itself_through_others() -> None:
    edges = graph()
    cycles = {" -> ".join(c) for name in sorted(edges) if (c := _cycle_from(name, edges))}
    assert not cycles, "\n".join(sorted(cycles))


def test_the_rule_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from nsbuild.cli import main\n")
    known = {"nsbuild.sandbox.m": module, "nsbuild.cli": module, "nsbuild.cli.main": module}
    assert imports("nsbuild.sandbox.m", module, known) == {"nsbuild.cli.main"}
    assert layer_of("nsbuild.cli.main") > layer_of("nsbuild.sandbox.m")


def test_the_farm_and_the_command_line_do_not_import_each_other() -> None:
    """Beside each other at the top: the farm takes nothing from nsbuild.cli
    (what it needs of it is duplicated, with a test that they agree)."""
    crossing = [
        f"{a} imports {b}"
        for a, targets in sorted(graph().items())
        if a.startswith("nsbuild.farm")
        for b in sorted(targets)
        if b.startswith("nsbuild.cli")
    ]
    assert not crossing, "\n".join(crossing)
