"""Fixtures shared by the streaming plane's tests against real actors."""

from __future__ import annotations

import pytest
import ray

from services.config_sources import load_settings
from services.embedded import free_port, start_ray


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A local Ray for the module's planes."""
    settings = load_settings(env={}, overrides={
        "metrics_port": free_port(), "data_dir": str(tmp_path_factory.mktemp("ray"))})
    start_ray(settings)
    yield
    ray.shutdown()
