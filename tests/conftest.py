"""Shared fixtures."""

from __future__ import annotations

import os
import tempfile

import pytest

# The response cache stays on, as users have it; only its location is the tests' own. This
# process (and every job it starts) keeps its answers in a directory of this session, and
# each test gets a fresh one (`isolated_response_cache`), so no answer carries over from one
# test to the next, nor from a user's own runs. Tests about `cache: off` turn it off themselves.
os.environ["RAYCLS_RESPONSE_CACHE"] = tempfile.mkdtemp(prefix="raycls-responses-")


@pytest.fixture(scope="module", autouse=True)
def module_response_cache(tmp_path_factory):
    """The same for a module's shared jobs (module-scoped fixtures run before any test's own)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYCLS_RESPONSE_CACHE", str(tmp_path_factory.mktemp("module-responses")))
        yield


@pytest.fixture(autouse=True)
def isolated_response_cache(tmp_path_factory, monkeypatch):
    """A response cache of the test's own (`RAYCLS_RESPONSE_CACHE`, the default location when a
    spec names no `cache.path`); yields its path."""
    path = tmp_path_factory.mktemp("responses")
    monkeypatch.setenv("RAYCLS_RESPONSE_CACHE", str(path))
    yield path


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
import json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
"""The development data sets, beside the checkout (CI has them there too)."""


def start_local_ray():
    """A real local Ray in this process, unless one runs already.

    It gets the logical CPUs a job's own Ray gets (`pipeline.MIN_LOCAL_CPUS`, 4): a resumed
    run holds one whole CPU in Ray's checkpoint filter actor, and on 2 logical CPUs the
    pipeline's 1-CPU tasks then never get scheduled (an in-process resume hangs)."""
    import ray

    from raycls.job.pipeline import MIN_LOCAL_CPUS

    if not ray.is_initialized():
        ray.init(num_cpus=MIN_LOCAL_CPUS, include_dashboard=False, logging_level="WARNING")
    return ray


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for one test module, shut down after it.

    One per module, not one per session: whatever a module's jobs leave in Ray (actors,
    workers, objects) cannot pile up and starve the jobs of the modules after it."""
    ray = start_local_ray()
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


UNPACED = {"rpm": 6000, "tpm": 100_000_000}
"""Per-key limits for test specs whose subject is not pacing: the spec's defaults (60 requests
and 100k tokens a minute) would make a 40-row test wait 40 s on its budget."""


def api_spec(directory: Path, base_url: str, rows: list[dict], keys: list[str], prompt: str = "basic", **backend):
    """A JobSpec for the openai backend: `rows` (text, label) written as JSONL under `directory`,
    `keys` into a key file there, referenced as `file:` (keys never sit in the spec).

    The key limits default to `UNPACED`: a test about pacing names its own."""
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
                    "api_keys": [f"file:{key_file}"], **UNPACED, **backend},
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


# --- incremental runs and remote storage: a lake of dt= partitions, a recording server ----

import re  # noqa: E402

LAKE_LABELS = ["negative", "positive"]
_ROW_TAG = re.compile(r"row (\S+): the room was (clean|dirty)")


def lake_rows(partition: str, part: int, n: int) -> list[dict]:
    """`n` rows whose text carries a tag `<partition>/<part>/<i>`, so a server can tell them apart."""
    return [{"text": f"row {partition}/{part}/{i}: the room was {'clean' if i % 2 else 'dirty'}",
             "label": LAKE_LABELS[i % 2]} for i in range(n)]


class RecordingOracle:
    """A fake server oracle that answers the gold label and records which row each request was for
    (`.seen`, in arrival order), so a test can tell which rows were sent and how often."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, prompt: str) -> str:
        hits = _ROW_TAG.findall(prompt)
        if not hits:
            return LAKE_LABELS[0]
        tag, word = hits[-1]
        self.seen.append(tag)
        return LAKE_LABELS[1] if word == "clean" else LAKE_LABELS[0]


def lake_spec(input_path: str, output_path: str, base_url: str, key_file: Path, **backend) -> dict:
    """A spec (as a dict, to dump as YAML or parse) labelling a lake through the openai backend."""
    return {
        "input": {"path": input_path, "gold_column": "label"},
        "labels": LAKE_LABELS,
        "output": {"path": output_path},
        "backend": {"kind": "openai", "base_url": base_url, "model": "fake-model",
                    "api_keys": [f"file:{key_file}"], **backend},
    }


def start_label_new(config: Path, log: Path, env: dict[str, str] | None = None, extra: tuple[str, ...] | list[str] = ()):
    """Start `jobs/label_new.py` as a scheduler would, in a session of its own: on the cluster at
    `RAY_ADDRESS` when `env` names one, else with a Ray of its own (a temp dir of its own, so it
    cannot join a `ray start` cluster someone else runs on this machine)."""
    import atexit
    import shutil
    import subprocess
    import sys
    import tempfile

    from raycls.testing.crashes import own_ray_env

    ray_tmp = tempfile.mkdtemp(prefix="rln-", dir="/tmp")  # short: Ray's socket paths live under it
    atexit.register(shutil.rmtree, ray_tmp, True)
    base = own_ray_env(ray_tmp)
    if env and "RAY_ADDRESS" in env:
        base.pop("RAY_TMPDIR")
    cmd = [sys.executable, str(REPO / "jobs" / "label_new.py"), "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**base, **(env or {})}, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


# --- S3: a real S3-protocol server (moto) on 127.0.0.1 -------------------------------------

from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict
    """What a client needs to reach it (credentials, region, `AWS_ENDPOINT_URL_S3`): set in this
    process while the fixture lives; pass it to subprocesses (their Ray workers inherit it)."""

    def fs(self):
        """A fresh s3fs filesystem on this server (no listing cache carried over)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret=self.env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)


@pytest.fixture(scope="session")
def moto_s3():
    """moto's ThreadedMotoServer on a free port of 127.0.0.1; this process's environment points
    S3 clients (boto3, s3fs, Ray workers started from here) at it until the session ends."""
    import logging
    import os

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(env["AWS_ENDPOINT_URL_S3"], env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3):
    """A new empty bucket on the moto server: `s3://<name>`."""
    import uuid

    name = f"raycls-test-{uuid.uuid4().hex[:10]}"
    moto_s3.fs().mkdir(name)
    return f"s3://{name}"


# --- classifier heads: a tiny training set and a head trained once per session ------------

AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def head_train_spec(data_path: Path, output: Path, **overrides) -> dict:
    """A train spec (as a dict) for a tiny MiniLM head: 1 epoch, max_length 32, 1 worker."""
    spec = {
        "data": {"path": str(data_path), "id_column": "id", "label_column": "label"},
        "labels": AGNEWS_LABELS,
        "validation": {"fraction": 0.25, "seed": 0},
        "model": {"base_model": "minilm", "method": "full", "max_length": 32},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-4},
        "ray": {"workers": 1, "cpus_per_worker": 1},
        "output": {"path": str(output)},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        spec[section] = {**spec[section], field: value} if field else value
    return spec


@pytest.fixture(scope="session")
def head_rows(tmp_path_factory) -> Path:
    """40 AG News training rows (all four classes) as JSONL."""
    import pyarrow.parquet as pq

    if not DATASETS.exists():
        pytest.fail(f"development data sets not found at {DATASETS}")
    rows = pq.read_table(DATASETS / "agnews_train.parquet").slice(0, 40).to_pylist()
    path = tmp_path_factory.mktemp("head_rows") / "train40.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def minilm_head(tmp_path_factory, head_rows) -> dict:
    """A MiniLM head trained once (full fine-tune, 1 epoch on 40 rows): train_metrics.json's content.
    It trains on the Ray that runs (the module's, which shuts it down after); the head stays on disk."""
    from raycls.train.run import train

    start_local_ray()
    from raycls.train.spec import parse_train_spec

    out = tmp_path_factory.mktemp("minilm_head")
    return train(parse_train_spec(head_train_spec(head_rows, out)))
