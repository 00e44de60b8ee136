#!/usr/bin/env python3
"""The import graph of the four packages: prints every import cycle and exits 1 if there is one.

Every ``import`` / ``from … import`` counts, module level or inside a function (a lazy import is still a
dependency), except those under ``if TYPE_CHECKING:``.  An edge goes to the module imported, or, for
``from package import name``, to ``package.name`` where that is a module.  Also checks that the service
(``dicom_node.node``, ``dicom_node.cli`` at module level) does not import the developer tooling.

Usage: ``python scripts/import_graph.py [--layers]`` (``--layers`` prints each subpackage's dependencies).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_node", "inference", "sr_templates", "orthanc_plugin")


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: dict[str, Path], *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking(node):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                for a in node.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
            if module_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(node, field, None)
                if isinstance(child, list) and child and isinstance(child[0], ast.stmt | ast.ExceptHandler):
                    visit([c for c in child if isinstance(c, ast.stmt)] +
                          [s for h in child if isinstance(h, ast.ExceptHandler) for s in h.body])

    visit(tree.body)
    return {m for m in found if m in known and m != name}


def graph(*, module_level_only: bool = False, root: Path = ROOT,
          packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {n: imports(n, p, known, module_level_only=module_level_only) for n, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(g.get(v, ()))
    return seen


def service_imports_devtools() -> list[str]:
    """Developer tooling the service reaches at import time (``serve`` and the CLI's module level)."""
    g = graph(module_level_only=True)
    bad = set()
    for root in ("dicom_node.node", "dicom_node.cli"):
        bad |= {m for m in reachable(g, root) if m.startswith("dicom_node.devtools")}
    return sorted(bad)


def main() -> int:
    g = graph()
    found = cycles(g)
    for comp in found:
        print("import cycle:", " <-> ".join(comp))
    dev = service_imports_devtools()
    for m in dev:
        print("the service imports developer tooling:", m)
    if "--layers" in sys.argv:
        def layer(m: str) -> str:
            parts = m.split(".")
            return ".".join(parts[:2]) if parts[0] == "dicom_node" and len(parts) > 2 else parts[0] if \
                parts[0] != "dicom_node" else m
        deps: dict[str, set[str]] = {}
        for m, targets in g.items():
            deps.setdefault(layer(m), set()).update(layer(t) for t in targets if layer(t) != layer(m))
        for k in sorted(deps):
            print(f"{k:32s} -> {', '.join(sorted(deps[k])) or '-'}")
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, {len(found)} cycles")
    return 1 if found or dev else 0


if __name__ == "__main__":
    sys.exit(main())
