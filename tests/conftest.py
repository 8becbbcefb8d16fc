from pathlib import Path

import pytest
import ray

# Real RSNA radiographs live beside the checkout, never inside it (see ../shared/data/README.md).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray cluster with the dashboard (Train-in-Tune needs it to release placement groups)."""
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    yield
    ray.shutdown()
