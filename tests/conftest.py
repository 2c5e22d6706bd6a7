from pathlib import Path
import pytest
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (only present beside the project checkout)")
    return SHARED_DATA


def _run_in(folder: Path, argv: list[str]) -> None:
    import os

    from cryo_lightning.cli import main

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        main(argv)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def cryol_in():
    """A function: ``cryol ARGV...`` run inside ``folder``, so relative paths resolve there."""
    return _run_in


@pytest.fixture(scope="session")
def cryol_fit():
    """A function: `cryol fit` on a YAML config text (whose ModelCheckpoint writes to ``ckpt/``),
    run inside ``folder``; it returns the run's ``ckpt/last.ckpt``."""

    def fit(folder: Path, config: str) -> Path:
        (folder / "tiny.yaml").write_text(config)
        _run_in(folder, ["fit", "--config", "tiny.yaml"])
        return folder / "ckpt" / "last.ckpt"

    return fit
