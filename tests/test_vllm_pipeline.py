"""End to end on a real local Ray with the real vLLM engine (CPU build) and the embedded model.

Each module-scoped job starts one engine (about 1.5 minutes here), then the tests read
what it wrote: the Parquet, `metrics.json`, and scikit-learn's figures on the same rows.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, f1_score

from raycls import schema
from raycls.config import parse_spec
from raycls.quality.metrics import NO_LABEL
from raycls.job.pipeline import run_job

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(900)]

AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
THUC_LABELS = ["finance", "realty", "stocks", "education", "science", "society", "politics", "sports", "game", "entertainment"]


def run(tmp_path_factory, ray_local, data_path, **spec):
    out = tmp_path_factory.mktemp("out")
    job = parse_spec({"output": {"path": str(out)}, "input": {"path": str(data_path)}, **spec})
    started = time.monotonic()
    result = run_job(job)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["_wall_s"] = time.monotonic() - started  # what the test saw, to hold elapsed_s against
    table = pq.read_table(out / "data")
    return job, result, table, metrics


@pytest.fixture(scope="module")
def agnews_job(tmp_path_factory, ray_local):
    """16 AG News rows, plus one with empty text and one far longer than the context."""
    from tests.conftest import DATASETS

    rows = pq.read_table(DATASETS / "agnews_dev.parquet").slice(0, 18).to_pylist()
    rows[16]["text"] = "   "
    rows[17]["text"] = " ".join([rows[17]["text"]] * 60)
    path = tmp_path_factory.mktemp("in") / "agnews18.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return run(
        tmp_path_factory, ray_local, path,
        input={"path": str(path), "id_column": "id", "gold_column": "label", "keep_columns": ["title"]},
        labels=AGNEWS_LABELS,
        instructions="Classify the news article by topic.",
        few_shot=[{"text": "The striker signed a three-year contract.", "label": "Sports"}],
        backend={"kind": "vllm", "max_model_len": 512, "batch_size": 8},
    ) + (rows,)


def test_every_row_comes_out_once(agnews_job):
    job, result, table, metrics, rows = agnews_job
    assert table.num_rows == len(rows) == metrics["rows_written"]
    assert sorted(table.column(schema.ID).to_pylist()) == sorted(r["id"] for r in rows)


def test_labels_are_always_in_the_label_set(agnews_job):
    table = agnews_job[2]
    labelled = [r for r in table.to_pylist() if r[schema.ERROR] is None]
    assert len(labelled) == 17
    assert all(r[schema.LABEL] in AGNEWS_LABELS for r in labelled)


def test_empty_text_is_kept_with_an_error_and_costs_no_model_call(agnews_job):
    table, rows = agnews_job[2], agnews_job[4]
    empty = next(r for r in table.to_pylist() if r[schema.ID] == rows[16]["id"])
    assert empty[schema.ERROR] == schema.EMPTY_TEXT and empty[schema.LABEL] is None
    assert empty[schema.INPUT_TOKENS] == 0 and empty[schema.OUTPUT_TOKENS] == 0


def test_text_longer_than_the_context_is_truncated_and_labelled(agnews_job):
    table, rows = agnews_job[2], agnews_job[4]
    long = next(r for r in table.to_pylist() if r[schema.ID] == rows[17]["id"])
    assert long[schema.TRUNCATED] is True and long[schema.LABEL] in AGNEWS_LABELS
    assert long[schema.INPUT_TOKENS] <= 512
    assert sum(r[schema.TRUNCATED] for r in table.to_pylist()) == 1


def test_output_schema(agnews_job):
    table = agnews_job[2]
    assert table.schema.names == [schema.ID, "title", "input_label", *schema.RESULT_COLUMNS]
    assert table.schema.field(schema.LABEL_PROBS).type == pa.struct([pa.field(n, pa.float64()) for n in AGNEWS_LABELS])
    row = next(r for r in table.to_pylist() if r[schema.ERROR] is None)
    assert row[schema.MODEL] == "embedded:gemma3-270m" and len(row[schema.PROMPT_ID]) == 16
    assert row[schema.INPUT_TOKENS] > 20 and row[schema.OUTPUT_TOKENS] >= 1


def test_confidence_is_the_probability_of_the_chosen_label(agnews_job):
    for row in agnews_job[2].to_pylist():
        if row[schema.ERROR] is None:
            probs = row[schema.LABEL_PROBS]
            assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-6)
            assert row[schema.CONFIDENCE] == pytest.approx(probs[row[schema.LABEL]])


def gold_and_predicted(table):
    """The full arrays scikit-learn would see: a row without a label counts as `<none>`."""
    gold = table.column("input_label").to_pylist()
    return gold, [p if p is not None else NO_LABEL for p in table.column(schema.LABEL).to_pylist()]


def test_metrics_equal_sklearn_on_the_written_rows(agnews_job):
    table, metrics = agnews_job[2], agnews_job[3]
    gold, pred = gold_and_predicted(table)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=AGNEWS_LABELS, average="macro", zero_division=0))
    assert metrics["rows_failed"] == 1 and metrics["failed_by_reason"] == {schema.EMPTY_TEXT: 1}
    # The throughput is the rows this run labelled over the time it took, as timed inside the run.
    assert 0 < metrics["elapsed_s"] <= metrics["_wall_s"]
    assert metrics["rows_resumed"] == 0
    assert metrics["rows_per_s"] == pytest.approx(metrics["rows_written"] / metrics["elapsed_s"], abs=1e-3)


@pytest.fixture(scope="module")
def thucnews_job(tmp_path_factory, ray_local):
    """16 Chinese news titles through the Chinese JSON prompt (reasoning, then a label enum)."""
    from tests.conftest import DATASETS

    lines = (DATASETS / "thucnews_titles_dev.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("in") / "thuc16.jsonl"
    path.write_text("\n".join(lines[::125][:16]) + "\n", encoding="utf-8")
    return run(
        tmp_path_factory, ray_local, path,
        input={"path": str(path), "id_column": "id", "gold_column": "label"},
        labels=THUC_LABELS, language="zh", prompt="json",
        backend={"kind": "vllm", "max_model_len": 512, "batch_size": 16, "max_tokens": 64},
    )


def test_json_prompt_rows_all_come_out_with_labels_from_the_set(thucnews_job):
    job, result, table, metrics = thucnews_job
    assert table.num_rows == 16 == metrics["rows_written"]
    for row in table.to_pylist():
        # The schema constrains the label, but a 64-token cap can cut the JSON short:
        # then the row says so instead of guessing.
        assert row[schema.LABEL] in THUC_LABELS or row[schema.ERROR] == schema.UNPARSEABLE
        assert row[schema.RAW_OUTPUT]
    assert metrics["rows_labeled"] >= 12


def test_json_prompt_metrics_equal_sklearn(thucnews_job):
    table, metrics = thucnews_job[2], thucnews_job[3]
    gold, pred = gold_and_predicted(table)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["weighted_f1"] == pytest.approx(f1_score(gold, pred, labels=THUC_LABELS, average="weighted", zero_division=0))


def gpu_memory_used_mib() -> list[int]:
    """Memory in use on each GPU, as the driver reports it (sees every process, in containers too)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return [int(v) for v in out.split()]


class GpuMemoryPeak:
    """The most GPU memory in use above what was in use before, sampled while a job runs."""

    def __init__(self) -> None:
        self.baseline = gpu_memory_used_mib()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, *(now - before for now, before in zip(gpu_memory_used_mib(), self.baseline)))

    def __enter__(self) -> "GpuMemoryPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.gpu
def test_engine_runs_on_a_gpu(tmp_path_factory, ray_local):
    """On a GPU machine the same job pins its engine to a GPU (the official vllm build): the
    engine takes GPU memory while the job runs (vLLM reserves most of the device for its KV cache)."""
    from raycls.backends.vllm import engines_on_gpu
    from tests.conftest import DATASETS

    assert shutil.which("nvidia-smi"), "a GPU machine without nvidia-smi: cannot see where the engine ran"
    with GpuMemoryPeak() as gpu:
        job, result, table, metrics = run(
            tmp_path_factory, ray_local, DATASETS / "agnews_dev.parquet",
            input={"path": str(DATASETS / "agnews_dev.parquet"), "id_column": "id", "gold_column": "label"},
            labels=AGNEWS_LABELS, limit=64,
            backend={"kind": "vllm", "gpus_per_engine": 1, "dtype": "auto"},
        )
    assert table.num_rows == 64 and metrics["rows_labeled"] == 64
    assert engines_on_gpu(job.backend)  # the job chose GPU engines
    assert gpu.peak >= 1024, f"GPU memory rose by only {gpu.peak} MiB while the job ran: the engine did not run on a GPU"
