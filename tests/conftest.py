"""Shared fixtures. torch is imported before anything Qt (napari) so its libraries load first."""

from __future__ import annotations

import os
from pathlib import Path

import torch  # noqa: F401  (import order: torch before Qt)
import pytest

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
SHARED_DATA = Path(os.environ.get("SPATIALSSL_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_benchmark(name: str):
    """A `benchmarks/<name>.py` script imported as a module (fresh each call: module-level settings
    read from the environment, such as peers.py's `$PEERS_ENV`, take the test's values)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} absent: the shared real-data folder ../shared/data is only beside CI and dev checkouts")
    return path


@pytest.fixture
def shared_data():
    return shared_file


@pytest.fixture(scope="session")
def osmfish_path() -> Path:
    return SAMPLE_DATA / "osmfish_cortex.h5ad"


@pytest.fixture(scope="session")
def starmap_path() -> Path:
    return SAMPLE_DATA / "starmap_mpfc_3slices.h5ad"
