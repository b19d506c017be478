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


# --- the API backend: inputs, key files and job specs against a local server ------------


def api_spec(directory: Path, base_url: str, rows: list[dict], keys: list[str], prompt: str = "basic", **backend):
    """A JobSpec for the openai backend: `rows` (text, label) written as JSONL under `directory`,
    `keys` into a key file there, referenced as `file:` (keys never sit in the spec)."""
    import json

    from raycls.config import parse_spec

    data = directory / "in.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    key_file = directory / "keys.txt"
    key_file.write_text("\n".join(keys) + "\n")
    return parse_spec({
        "input": {"path": str(data), "gold_column": "label"},
        "labels": sorted({r["label"] for r in rows}),
        "prompt": prompt,
        "output": {"path": str(directory / "out")},
        "backend": {"kind": "openai", "base_url": base_url, "model": "fake-model",
                    "api_keys": [f"file:{key_file}"], **backend},
    })


@pytest.fixture
def api_job(tmp_path):
    """Factory: `api_job(base_url, rows, keys, prompt=..., **backend)` → JobSpec (see `api_spec`)."""

    def make(base_url: str, rows: list[dict], keys: list[str], prompt: str = "basic", **backend):
        return api_spec(tmp_path, base_url, rows, keys, prompt, **backend)

    return make


def review_rows(n: int) -> list[dict]:
    """`n` short synthetic reviews with gold labels; row 3 has empty text (it must cost no call)."""
    rows = [{"text": f"review {i}: the room was {'clean and quiet' if i % 2 else 'dirty and loud'}",
             "label": "positive" if i % 2 else "negative"} for i in range(n)]
    if n > 3:
        rows[3]["text"] = ""
    return rows
