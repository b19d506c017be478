"""The API backend against the real thing: vLLM's OpenAI server (CPU build) with the embedded Gemma.

The server is started once for the module, under `flock /tmp/raycls-vllm.lock` (this
machine runs one vLLM engine at a time), and labels Chinese hotel reviews through
`/v1/completions` (the base model has no chat template): constrained with vLLM's
`choice`, confidence from the returned top logprobs; then with a JSON schema, on which
this small model often writes only whitespace — a real bad answer the backend must
survive with re-asks and an explicit row error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.config import parse_spec
from raycls.job.pipeline import run_job
from tests.conftest import DATASETS

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(1500)]

LABELS = [{"name": "positive", "description": "正面评价"}, {"name": "negative", "description": "负面评价"}]
ROWS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with the embedded model."""
    from raycls.prompting.model import embedded_model_dir

    model = embedded_model_dir()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    command = [
        "flock", "/tmp/raycls-vllm.lock", sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--enforce-eager", "--max-model-len", "512", "--served-model-name", "gemma",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 1200  # waiting for the lock, then ~80 s of engine start
        while not _ready(base_url):
            if server.poll() is not None:
                pytest.fail(f"vLLM server exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"vLLM server not ready in time:\n{log_path.read_text()[-3000:]}")
            time.sleep(2)
        yield base_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group we started: flock, the server, its engine
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _run(tmp_path_factory, base_url: str, prompt: str, rows: int, **backend):
    work = tmp_path_factory.mktemp(f"api_vllm_{prompt}")
    (work / "keys.txt").write_text("EMPTY\n")  # the local server checks no key; the client needs one
    spec = parse_spec({
        "input": {"path": str(DATASETS / "chnsenticorp_htl_dev.jsonl"), "id_column": "id", "gold_column": "label"},
        "labels": LABELS,
        "language": "zh",
        "prompt": prompt,
        "limit": rows,
        "output": {"path": str(work / "out")},
        "backend": {"kind": "openai", "base_url": base_url, "model": "gemma", "api_keys": [f"file:{work / 'keys.txt'}"],
                    "endpoint": "completions", "context_window": 512, "rpm": 6000, "tpm": 10_000_000,
                    "max_concurrency": 4, "timeout_s": 120, **backend},
    })
    result = run_job(spec)
    out = pq.read_table(f"{result.output_path}/data").to_pylist()
    return out, json.loads(open(f"{result.output_path}/metrics.json").read())


@pytest.fixture(scope="module")
def choice_run(vllm_server, tmp_path_factory, ray_local):
    return _run(tmp_path_factory, vllm_server, "basic", ROWS, response_format="choice")


def test_every_row_comes_back_once(choice_run):
    out, metrics = choice_run
    assert len(out) == ROWS == metrics["rows_written"] and len({r[schema.ID] for r in out}) == ROWS


def test_every_row_gets_a_label_from_the_set(choice_run):
    out, _ = choice_run
    assert len(out) == ROWS
    assert {r[schema.LABEL] for r in out} <= {"positive", "negative"} and all(r[schema.ERROR] is None for r in out)


def test_confidence_from_the_servers_top_logprobs(choice_run):
    out, _ = choice_run
    assert len(out) == ROWS
    for row in out:
        assert 0.0 < row[schema.CONFIDENCE] <= 1.0
        assert sum(row[schema.LABEL_PROBS].values()) == pytest.approx(1.0)


def test_tokens_from_the_servers_usage(choice_run):
    out, metrics = choice_run
    assert len(out) == ROWS and all(r[schema.INPUT_TOKENS] > 20 and r[schema.OUTPUT_TOKENS] >= 1 for r in out)
    assert metrics["input_tokens"] == sum(r[schema.INPUT_TOKENS] for r in out)


def test_metrics_are_computed_against_the_gold_labels(choice_run):
    out, metrics = choice_run
    gold = schema.stored_name("label")  # the input's `label` column, kept beside the prediction
    correct = sum(r[schema.LABEL] == r[gold] for r in out)
    assert metrics["accuracy"] == pytest.approx(correct / ROWS)


def test_json_schema_answers_are_labelled_or_failed_explicitly(vllm_server, tmp_path_factory, ray_local):
    out, metrics = _run(tmp_path_factory, vllm_server, "json", 6, response_format="json_schema", max_tokens=48, max_reasks=1)
    labelled = [r for r in out if r[schema.LABEL] in ("positive", "negative") and r[schema.ERROR] is None]
    failed = [r for r in out if r[schema.LABEL] is None and r[schema.ERROR] == schema.UNPARSEABLE]
    assert len(out) == 6 == metrics["rows_written"] == len(labelled) + len(failed)  # no row in any other state
    assert all(r[schema.RAW_OUTPUT] is not None for r in failed)  # a failed row keeps what the model wrote
