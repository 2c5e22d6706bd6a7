"""Layering: physics and models never import Lightning (DESIGN §2)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["cryo_lightning.physics", "cryo_lightning.models"])
def test_package_imports_without_lightning(package):
    code = (
        "import importlib, pkgutil, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"pkg = importlib.import_module('{package}')\n"
        "for m in pkgutil.iter_modules(pkg.__path__):\n"
        f"    importlib.import_module('{package}.' + m.name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _module_imports(package_dir, prefix: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in the file, lazily too)."""
    import ast

    graph = {}
    for path in sorted(package_dir.glob("*.py")):
        name = f"{prefix}.{path.stem}"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix + "."):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith(prefix + ".")}
        graph[name] = targets - {name}
    return graph


def test_io_has_no_import_circle():
    """Issue 26, item 1: the readers build a ParticleTable (a leaf) and the dispatcher
    read_particles lives in its own module, so no io module reaches itself through its imports."""
    from pathlib import Path

    import cryo_lightning.io as io

    graph = _module_imports(Path(io.__file__).parent, "cryo_lightning.io")
    assert graph["cryo_lightning.io.particle_table"] <= {"cryo_lightning.io.errors"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    circles = [m for m in graph if reaches(m, m, {m})]
    assert not circles, f"import circles through {circles}"
