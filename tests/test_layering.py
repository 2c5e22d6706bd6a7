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
