"""The `classifier` backend end to end: a head trained here labels rows through `run_job`
on a real local Ray (a Ray Data actor pool holding the torch model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, f1_score

from raycls import schema
from raycls.backends.classifier import PROMPT_ID
from raycls.config import parse_spec
from raycls.errors import SpecError
from raycls.quality.metrics import NO_LABEL
from raycls.job.pipeline import run_job
from tests.conftest import AGNEWS_LABELS, DATASETS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

MAX_LENGTH = 32


def job(input_path: Path, out: Path, model_dir: str, labels=AGNEWS_LABELS, cache: dict | None = None, **backend):
    return parse_spec({
        "input": {"path": str(input_path), "id_column": "id", "gold_column": "label", "keep_columns": ["title"]},
        "labels": labels,
        "backend": {"kind": "classifier", "model": model_dir, "max_length": MAX_LENGTH, "batch_size": 8, **backend},
        "output": {"path": str(out)},
        **({"cache": cache} if cache else {}),
    })


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_local, minilm_head):
    """24 AG News dev rows (never trained on), one with an empty text, one far over max_length."""
    rows = pq.read_table(DATASETS / "agnews_dev.parquet").slice(0, 24).to_pylist()
    rows[5]["text"] = "   "
    rows[6]["text"] = " ".join([rows[6]["text"]] * 10)
    path = tmp_path_factory.mktemp("in") / "dev24.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path_factory.mktemp("out")
    result = run_job(job(path, out, minilm_head["model_dir"], actors=2, num_cpus=1))
    return rows, pq.read_table(out / "data").sort_by(schema.ID), result.metrics


def test_every_row_comes_out_once_with_a_label_from_the_set(labelled):
    rows, table, _ = labelled
    assert sorted(table.column(schema.ID).to_pylist()) == sorted(r["id"] for r in rows)
    by_id = {r[schema.ID]: r for r in table.to_pylist()}
    empty = by_id[rows[5]["id"]]
    assert empty[schema.ERROR] == schema.EMPTY_TEXT and empty[schema.LABEL] is None and empty[schema.INPUT_TOKENS] == 0
    labelled_rows = [r for r in table.to_pylist() if r[schema.ERROR] is None]
    assert len(labelled_rows) == 23 and all(r[schema.LABEL] in AGNEWS_LABELS for r in labelled_rows)
    assert all(r[schema.MODEL] and r[schema.PROMPT_ID] == PROMPT_ID for r in table.to_pylist())


def test_probabilities_are_a_softmax_and_confidence_is_the_label_s(labelled):
    _, table, _ = labelled
    for row in table.to_pylist():
        if row[schema.ERROR] is not None:
            continue
        probs = row[schema.LABEL_PROBS]
        assert list(probs) == AGNEWS_LABELS
        assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-6)
        assert row[schema.LABEL] == max(probs, key=probs.get) and row[schema.CONFIDENCE] == probs[row[schema.LABEL]]


def test_long_text_is_truncated_and_flagged(labelled):
    rows, table, _ = labelled
    by_id = {r[schema.ID]: r for r in table.to_pylist()}
    long = by_id[rows[6]["id"]]
    assert long[schema.TRUNCATED] is True and long[schema.INPUT_TOKENS] == MAX_LENGTH and long[schema.LABEL] in AGNEWS_LABELS
    assert all(r[schema.INPUT_TOKENS] <= MAX_LENGTH for r in by_id.values())


def test_metrics_equal_sklearn_on_the_written_rows(labelled):
    _, table, metrics = labelled
    gold = table.column("input_label").to_pylist()
    pred = [p if p is not None else NO_LABEL for p in table.column(schema.LABEL).to_pylist()]
    assert metrics["rows_written"] == 24 and metrics["failed_by_reason"] == {schema.EMPTY_TEXT: 1}
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=AGNEWS_LABELS, average="macro", zero_division=0))


def test_with_the_response_cache_a_second_run_takes_every_label_from_it(tmp_path, ray_local, minilm_head):
    """The head writes no `reasoning` or `raw_output`: the cache must restore its rows all the same."""
    path = tmp_path / "dev8.parquet"
    pq.write_table(pq.read_table(DATASETS / "agnews_dev.parquet").slice(0, 8), path)
    cache = {"path": str(tmp_path / "cache")}
    run_job(job(path, tmp_path / "first", minilm_head["model_dir"], cache=cache))
    run_job(job(path, tmp_path / "second", minilm_head["model_dir"], cache=cache))
    first = pq.read_table(tmp_path / "first" / "data").sort_by(schema.ID).to_pylist()
    second = pq.read_table(tmp_path / "second" / "data").sort_by(schema.ID).to_pylist()
    assert len(second) == 8 and not any(r[schema.CACHED] for r in first)
    assert all(r[schema.CACHED] for r in second)
    assert [r[schema.LABEL] for r in second] == [r[schema.LABEL] for r in first]


def test_a_head_with_other_labels_is_refused_before_any_row_is_read(tmp_path, ray_local, minilm_head):
    spec = job(tmp_path / "no-such-input.parquet", tmp_path / "out", minilm_head["model_dir"], labels=["positive", "negative"])
    with pytest.raises(SpecError, match=r"backend\.model: the head in .* was trained on labels \['World', 'Sports', 'Business', "
                                        r"'Sci/Tech'\], but the job's labels are \['positive', 'negative'\]"):
        run_job(spec)
    assert not (tmp_path / "out" / "data").exists()


def test_a_directory_that_is_no_head_is_refused(tmp_path, ray_local):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SpecError, match="not a trained classifier directory"):
        run_job(job(tmp_path / "in.parquet", tmp_path / "out", str(tmp_path / "model")))


def retrain_in_place(model_dir: Path) -> None:
    """What `raycls train --overwrite` leaves: new weights under the same config and labels."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from raycls.train.onnx_export import export_onnx, served_onnx

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.flip(model.classifier.weight, dims=[0]))  # the classes' scores swapped
    config_before = (model_dir / "config.json").read_bytes()
    model.save_pretrained(model_dir)
    (model_dir / "config.json").write_bytes(config_before)
    if served_onnx(model_dir) is not None:  # the export the backend serves, made again from the new weights
        export_onnx(model_dir)


def test_a_head_retrained_in_place_is_another_model_for_the_cache_and_for_resume(tmp_path, ray_local, minilm_head):
    import shutil

    from raycls.errors import ResumeError

    head = tmp_path / "head"
    shutil.copytree(minilm_head["model_dir"], head)
    path = tmp_path / "dev8.parquet"
    pq.write_table(pq.read_table(DATASETS / "agnews_dev.parquet").slice(0, 8), path)
    cache = {"path": str(tmp_path / "cache")}
    run_job(job(path, tmp_path / "old", str(head), cache=cache))
    retrain_in_place(head)
    with pytest.raises(ResumeError, match="backend.model_sha256"):  # the old output is not the new model's
        run_job(job(path, tmp_path / "old", str(head), cache=cache))
    run_job(job(path, tmp_path / "new", str(head), cache=cache))
    old = pq.read_table(tmp_path / "old" / "data").sort_by(schema.ID).to_pylist()
    new = pq.read_table(tmp_path / "new" / "data").sort_by(schema.ID).to_pylist()
    assert not any(r[schema.CACHED] for r in new)  # nothing served from the old model's answers
    assert [r[schema.LABEL_PROBS] for r in new] != [r[schema.LABEL_PROBS] for r in old]
