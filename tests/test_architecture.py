"""The layout's promises: no import cycle in the four packages, and the service never imports developer tooling."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
assert _spec is not None and _spec.loader is not None
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def test_no_import_cycle() -> None:
    assert import_graph.cycles(import_graph.graph()) == []


def test_checker_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")  # lazy: still a cycle
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    g = import_graph.graph(root=tmp_path, packages=("pkg",))
    assert import_graph.cycles(g) == [["pkg.a", "pkg.sub.b"]]
    assert "pkg.a" not in g["pkg.c"], "imports for type checking only are not dependencies"


def test_service_does_not_import_developer_tooling() -> None:
    assert import_graph.service_imports_devtools() == []
    code = ("import sys, dicom_node.cli, dicom_node.node\n"
            "bad = sorted(m for m in sys.modules if m.startswith('dicom_node.devtools'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_script_exits_zero() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("0 cycles")
