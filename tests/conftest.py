"""Shared fixtures: the project root on sys.path, real process clusters, small data files."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.cluster import Cluster  # noqa: E402
from shared.datasets import load_split  # noqa: E402
from shared.errors import DatasetNotFound  # noqa: E402


@pytest.fixture
def cluster(tmp_path: Path):
    """A Cluster in a temp dir; every process it started is stopped by PID afterwards."""
    with Cluster(tmp_path) as c:
        yield c


@pytest.fixture(scope="session")
def fmnist() -> None:
    """Fashion-MNIST must be present: CI installs it (bash .ci/setup.sh); never skip silently."""
    try:
        load_split("fashion-mnist", train=False, download=False)
    except DatasetNotFound as exc:
        pytest.fail(f"Fashion-MNIST is required for this test; run `bash .ci/setup.sh` first ({exc})")
