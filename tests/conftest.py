"""Shared fixtures. Integration tests share one real Ray cluster per test session (starting Ray costs ~15 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory) -> str:
    """A local Ray cluster started by this test session (dashboard on 127.0.0.1, as Tune needs on 2 CPUs);
    stages run as subprocesses join it through RAY_ADDRESS, exactly as they would join a real cluster."""
    import ray

    import resnet  # noqa: F401  (sets Ray's environment defaults before Ray is imported)

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
