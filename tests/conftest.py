from pathlib import Path
import pytest
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (only present beside the project checkout)")
    return SHARED_DATA
