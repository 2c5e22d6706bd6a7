"""Every config under configs/ resolves by the command its header comment states.

An experiment's config may be a few overrides that go after a base of configs/base/ (LightningCLI
merges several ``--config`` files in order), so the command that runs it is part of the config:
the header states it, and this test runs exactly that command with ``--print_config``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from cryo_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BASES = CONFIGS / "base"
EXPERIMENTS = sorted(p for p in CONFIGS.rglob("*.yaml") if BASES not in p.parents)


def header_command(path: Path) -> list[str]:
    """The ``cryol`` command (without ``cryol``) in the header comment of ``path`` that names it
    with ``--config``; a trailing backslash continues a command on the next comment line."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    own = f"--config {path.relative_to(ROOT)}"
    for line in "\n".join(header).replace("\\\n", " ").splitlines():
        found = re.search(r"\bcryol (fit|validate|test|submit) .*", line)
        if found and own in found.group(0):
            return shlex.split(found.group(0).rstrip("`"))[1:]
    raise AssertionError(f"{path.relative_to(ROOT)}: no header line states the command that runs it "
                         f"(`cryol <verb> ... {own}`)")


def config_files(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--config"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_header_command_resolves(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the commands are given from the repository root
    argv = header_command(path)
    if argv[0] == "submit":  # cryol submit's own options; the trainer command after `--` is resolved below
        split = argv.index("--")
        fit = argv[split + 1:]
        argv = [*argv[:split], "--print_config", "--"]
        assert fit[0] == "fit" and all((ROOT / c).is_file() for c in config_files(fit)), fit
    else:
        # the experiment's own file comes last: its settings override the base's
        assert config_files(argv)[-1] == str(path.relative_to(ROOT)), argv
        argv = [*argv, "--print_config"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out = capsys.readouterr().out
    assert stop.value.code in (0, None), out
    resolved = yaml.safe_load(out)
    if argv[0] == "submit":
        assert resolved["cluster"] == yaml.safe_load(path.read_text())["cluster"]
    else:
        assert resolved["model"]["class_path"] and resolved["data"]["class_path"]
        assert resolved["trainer"]["default_root_dir"].startswith("runs/")


def test_every_base_is_used():
    used = {c for p in EXPERIMENTS for c in config_files(header_command(p))}
    for base in sorted(BASES.glob("*.yaml")):
        assert str(base.relative_to(ROOT)) in used, f"{base.relative_to(ROOT)} is no experiment's base"
