"""One contract for every backend: the same small job through the API backend (the
fault-injection server), the classifier backend (a tiny MiniLM head) and vLLM (the embedded
model, CPU build), each with a verbalized label (`answer:`), with and without calibration,
with the response cache on and off.

What every case must show: rows out = rows in; labels in the label set; every label can get
probability (a verbalized label too); tokens counted on rows a model answered; and the same
output with the cache on (a fresh store, then served from it) as with it off, but for the
`cached` column and the tokens of rows served from the cache.

vLLM starts an engine per pass (a job with calibration makes two), about 80 s each here, so
its cases share: `calibration: none` with the cache on is served from the store the batch
case filled (calibration is applied after the cache, so it shares the namespace), and is
checked against the raw probabilities of the batch case with the cache off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.config import parse_spec
from raycls.job.pipeline import run_job
from tests.conftest import AGNEWS_LABELS, DATASETS, REPO, UNPACED

pytestmark = [pytest.mark.ray, pytest.mark.timeout(2400)]

SAME = (schema.ID, schema.LABEL, schema.CONFIDENCE, schema.LABEL_PROBS, schema.LABEL_PROBS_RAW, schema.REASONING,
        schema.RAW_OUTPUT, schema.ERROR, schema.TRUNCATED, schema.MULTI_LABEL, schema.MODEL, schema.PROMPT_ID)
"""What the cache may not change."""
VERBALIZED = [*AGNEWS_LABELS[:3], {"name": "Sci/Tech", "answer": "Technology"}]


def run(spec: dict, out: Path, cache: Path | None) -> tuple[list[dict], dict]:
    """`spec` into `out`, with the cache at `cache` (None: off); rows by id and metrics.json."""
    spec = {**spec, "output": {"path": str(out)},
            "cache": {"path": str(cache)} if cache else {"enabled": False}}
    run_job(parse_spec(spec))
    rows = sorted(pq.read_table(out / "data").to_pylist(), key=lambda r: r[schema.ID])
    return rows, json.loads((out / "metrics.json").read_text())


def three_runs(spec: dict, tmp: Path) -> dict[str, tuple[list[dict], dict]]:
    """The cache off, on into a fresh store, and on again (served from that store)."""
    store = tmp / "store"
    return {"off": run(spec, tmp / "off", None), "fresh": run(spec, tmp / "fresh", store),
            "served": run(spec, tmp / "served", store)}


def check_contract(runs: dict[str, tuple[list[dict], dict]], rows_in: int, prior_rows: int = 0) -> None:
    """The contract over `off`, `fresh` and (where run) `served`; see the module docstring.

    `prior_rows`: rows of the input the calibration pass labels first (`calibration: batch`);
    with the cache on, the main pass takes their answers from it, even in a fresh store."""
    off, _ = runs["off"]
    for name, (rows, metrics) in runs.items():
        assert len(rows) == rows_in == metrics["rows_written"], name
        labelled = [r for r in rows if r[schema.ERROR] is None]
        assert labelled and all(r[schema.LABEL] in AGNEWS_LABELS for r in labelled), name
        assert all(list(r[schema.LABEL_PROBS]) == AGNEWS_LABELS for r in labelled), name
        for label in AGNEWS_LABELS:  # a verbalized label's probability survives every path
            assert any(r[schema.LABEL_PROBS][label] > 0 for r in labelled), (name, label)
        assert [{k: r[k] for k in SAME} for r in rows] == [{k: r[k] for k in SAME} for r in off], name
        answered = [r for r in labelled if not r[schema.CACHED]]
        assert all(r[schema.INPUT_TOKENS] > 0 for r in answered), name
        assert all(r[schema.INPUT_TOKENS] == 0 for r in labelled if r[schema.CACHED]), name
    assert not any(r[schema.CACHED] for r in off) and "cache" not in runs["off"][1]
    assert runs["fresh"][1]["rows_cached"] == prior_rows
    if "served" in runs:
        served, metrics = runs["served"]
        assert all(r[schema.CACHED] for r in served if r[schema.ERROR] is None)
        assert metrics["rows_cached"] == sum(r[schema.ERROR] is None for r in served) <= metrics["cache"]["hits"]


# -- the API backend, against the fault-injection server -------------------------------------

WORDS = {"World": "World", "Sports": "Sports", "Business": "Business", "Sci/Tech": "Technology"}


def _oracle(prompt: str) -> str:
    """Answers the gold label's word, read from the row's text (`<label>: ...`)."""
    text = prompt.rsplit("Text:", 1)[-1]
    return next((word for name, word in WORDS.items() if f"[{name}]" in text), "World")


@pytest.fixture(scope="module")
def api_case(ray_local, tmp_path_factory):
    from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

    tmp = tmp_path_factory.mktemp("api")
    rows = [{"id": f"r{i:02d}", "text": f"item {i} [{AGNEWS_LABELS[i % 4]}] news of the day", "label": AGNEWS_LABELS[i % 4]}
            for i in range(12)]
    rows.append({"id": "r99", "text": "   ", "label": "World"})  # no text: no call, kept with its error
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "keys.txt").write_text("sk-contract\n")

    def spec(base_url: str, calibration: str) -> dict:
        return {"input": {"path": str(tmp / "in.jsonl"), "id_column": "id", "gold_column": "label"},
                "labels": VERBALIZED, "calibration": {"method": calibration, "sample_rows": 8},
                "backend": {"kind": "openai", "base_url": base_url, "model": "fake-model", "endpoint": "completions",
                            "api_keys": [f"file:{tmp / 'keys.txt'}"], "batch_size": 4, **UNPACED}}

    with FakeOpenAI(FakeOpenAIConfig(labels=list(WORDS.values()), oracle=_oracle, keys=["sk-contract"])) as server:
        yield len(rows), {c: three_runs(spec(server.base_url, c), tmp / c) for c in ("none", "batch")}


@pytest.mark.parametrize("calibration", ["none", "batch"])
def test_api_backend_keeps_the_contract_with_the_cache_on_and_off(api_case, calibration):
    rows_in, runs = api_case
    check_contract(runs[calibration], rows_in, prior_rows=8 if calibration == "batch" else 0)
    off = runs[calibration]["off"][0]
    if calibration == "batch":
        assert all(r[schema.LABEL_PROBS_RAW] is not None for r in off if r[schema.ERROR] is None)
    assert [r[schema.ERROR] for r in off].count(schema.EMPTY_TEXT) == 1


# -- the classifier backend: a tiny head ------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_case(ray_local, tmp_path_factory, minilm_head):
    rows = pq.read_table(DATASETS / "agnews_dev.parquet").slice(0, 12)
    path = tmp_path_factory.mktemp("in") / "dev12.parquet"
    pq.write_table(rows, path)
    tmp = tmp_path_factory.mktemp("classifier")

    def spec(calibration: str) -> dict:
        return {"input": {"path": str(path), "id_column": "id", "gold_column": "label"},
                "labels": VERBALIZED, "calibration": {"method": calibration, "sample_rows": 8},
                "backend": {"kind": "classifier", "model": minilm_head["model_dir"], "max_length": 32, "batch_size": 4}}

    return rows.num_rows, {c: three_runs(spec(c), tmp / c) for c in ("none", "batch")}


@pytest.mark.parametrize("calibration", ["none", "batch"])
def test_classifier_backend_keeps_the_contract_with_the_cache_on_and_off(classifier_case, calibration):
    rows_in, runs = classifier_case
    check_contract(runs[calibration], rows_in, prior_rows=8 if calibration == "batch" else 0)


# -- vLLM on the embedded model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_case(ray_local, tmp_path_factory):
    """The README demo's job (a verbalized label, batch calibration) with the cache off and on,
    then `calibration: none` served from the store the batch run filled."""
    import yaml

    tmp = tmp_path_factory.mktemp("vllm")
    spec = yaml.safe_load((REPO / "jobs" / "configs" / "demo.yaml").read_text())
    spec["input"]["path"] = str(REPO / spec["input"]["path"])
    store = tmp / "store"
    runs = {"off": run(spec, tmp / "off", None), "fresh": run(spec, tmp / "fresh", store)}
    runs["none_served"] = run({**spec, "calibration": "none"}, tmp / "none", store)
    return spec, runs


@pytest.mark.vllm
def test_vllm_backend_keeps_the_contract_with_the_cache_on_and_off(vllm_case):
    _, runs = vllm_case
    check_contract({"off": runs["off"], "fresh": runs["fresh"]}, 24, prior_rows=24)  # served again: the README test


@pytest.mark.vllm
def test_vllm_without_calibration_served_from_the_cache_gives_the_raw_probabilities(vllm_case):
    _, runs = vllm_case
    off, _ = runs["off"]
    served, metrics = runs["none_served"]
    assert metrics["rows_cached"] == 24 and metrics["input_tokens"] == 0
    assert [r[schema.LABEL_PROBS] for r in served] == [r[schema.LABEL_PROBS_RAW] for r in off]
    assert [r[schema.LABEL_PROBS_RAW] for r in served] == [None] * 24
    for row in served:
        assert row[schema.LABEL] == max(row[schema.LABEL_PROBS], key=row[schema.LABEL_PROBS].get)
