"""Shared fixtures: a local Ray cluster on demand, the Shakespeare sample, and the gpu skip."""

from pathlib import Path

import pytest

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray cluster, started by the first test that asks, stopped at session end."""
    import ray  # here, so tests that never ask pay nothing

    # address="local": always a fresh cluster of our own, even when RAY_ADDRESS is set
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture
def shakespeare_path() -> Path:
    """../shared/data/tinyshakespeare.txt beside the repo (about 1 MB of plays)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    return SHAKESPEARE


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only when some collected test is marked gpu

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA; torch.cuda.is_available() is False")
        for item in gpu_items:
            item.add_marker(skip)
