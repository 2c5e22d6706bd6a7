"""Layering: every import in cryo_lightning/ points down the house plan, and none closes a circle.

The plan (README, "Layout"), lowest first::

    physics <- metrics <- io <- plots <- denoise <- abinitio <- data <- models <- tasks <- tools <- cli <- launch

A module may import its own package and any package below it. Imports are read from the source
(``ast``), lazy ones inside functions included, so an import hidden in a function body to dodge a
circle still counts. The one sanctioned reach upwards is the CLI's verb table, which names the
front ends (tools/ and ``launch/command.py``) as strings and imports the chosen one when a
command runs; launch sits above the CLI because it runs cryol verbs inside jobs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cryo_lightning

LAYERS = ["physics", "metrics", "io", "plots", "denoise", "abinitio", "data", "models", "tasks", "tools", "cli",
          "launch", "__main__"]
ROOT = Path(cryo_lightning.__file__).parent
PACKAGE = "cryo_lightning"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """The package (or top-level module) a ``cryo_lightning.*`` module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The ``cryo_lightning`` modules that ``path`` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                # `from cryo_lightning.x import y` may name a submodule y
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")}
    return found - {name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_package_has_a_place_in_the_plan():
    layers = {_layer(m) for m in _graph()} - {"__init__"}
    assert layers <= set(LAYERS), f"packages missing from LAYERS: {sorted(layers - set(LAYERS))}"


def test_no_import_points_up():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            a, b = _layer(module), _layer(target)
            if "__init__" in (a, b):  # the root package holds only __version__
                continue
            if rank[b] > rank[a]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports pointing up the house plan:\n  " + "\n  ".join(sorted(upward))


def test_root_package_imports_nothing_of_its_own():
    assert not _imports(ROOT / "__init__.py")


def test_no_import_circle():
    """No module reaches itself through its imports (a package's ``__init__`` counts as a module)."""
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt in graph and nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n  " + "\n  ".join(circles)


def test_cli_verb_table_names_only_front_ends():
    """The sanctioned upward reach: the CLI names its tools by string and imports one when run."""
    from cryo_lightning.cli import TOOLS

    for verb, (module, _) in TOOLS.items():
        assert _layer(module) in ("tools", "launch"), f"cryol {verb} -> {module}"
        assert (ROOT.parent / module.replace(".", "/")).with_suffix(".py").exists(), f"cryol {verb}: {module} missing"


def test_the_checker_sees_lazy_and_upward_imports(tmp_path):
    """The parser finds imports inside functions and resolves relative ones (so the tests above can fail)."""
    pkg = tmp_path / PACKAGE / "physics"
    pkg.mkdir(parents=True)
    source = pkg / "probe.py"
    source.write_text("def f():\n    from cryo_lightning.tasks.denoise import DenoiseTask\n"
                      "from .fourier import fft2c\nimport cryo_lightning.io.mrc\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path / PACKAGE
    try:
        found = _imports(source)
    finally:
        ROOT = saved
    assert found == {"cryo_lightning.tasks.denoise", "cryo_lightning.physics.fourier", "cryo_lightning.io.mrc"}


@pytest.mark.parametrize("package", ["cryo_lightning.physics", "cryo_lightning.models"])
def test_package_imports_without_lightning(package):
    """physics/ and models/ are plain torch: importing every module works with Lightning blocked."""
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


def test_io_particle_table_is_a_leaf():
    """Issue 26, item 1: the readers build a ParticleTable, which imports only io/errors."""
    assert _imports(ROOT / "io" / "particle_table.py") <= {"cryo_lightning.io.errors"}
