"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def fake_openai():
    """Factory: `fake_openai(**FakeOpenAIConfig fields) -> FakeOpenAI`, started on a free port
    of 127.0.0.1 (`.base_url`, `.stats()`, `.revoke(key)`); every server stops after the test."""
    from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

    servers: list[FakeOpenAI] = []

    def start(**config) -> FakeOpenAI:
        server = FakeOpenAI(FakeOpenAIConfig(**config))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# --- shared paths and a real local Ray ------------------------------------------------

from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
"""The development data sets, beside the checkout (CI has them there too)."""


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (2 CPUs), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def datasets() -> Path:
    if not DATASETS.exists():
        pytest.fail(f"development data sets not found at {DATASETS}")
    return DATASETS


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip, and say so, on machines without a GPU."""
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
