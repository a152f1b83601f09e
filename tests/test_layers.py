"""Layering facts the restructure promised (checked on the source, without importing it)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ipadapter"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.add(base)
            found.update(f"{base}.{a.name}" if not base.endswith(".") else base + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_evaluation_takes_the_world_judge_as_a_plug_in_and_never_imports_the_world():
    for path in (SRC / "evaluation").glob("*.py"):
        names = _imports(path)
        assert not [n for n in names if "world" in n], (path, sorted(n for n in names if "world" in n))
