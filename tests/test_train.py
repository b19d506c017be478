"""Training classifier heads on a real local Ray Train with real models, at tiny sizes.

The MiniLM head (all-MiniLM-L6-v2 from PyPI) trains in seconds; the one Gemma test trains
LoRA adapters on the embedded Gemma 3 270M. Bad-input cases stop before any training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raycls import schema
from raycls.config import parse_spec
from raycls.errors import InputError, ResumeError, SpecError
from raycls.job.pipeline import run_job
from raycls.cli import main as raycls_main
from raycls.train.data import SKIP_EMPTY, SKIP_ERROR, SKIP_LOW_CONFIDENCE, SKIP_UNKNOWN, load_data
from raycls.train.heads import check_loadable, resolve_base_model
from raycls.train.loop import EPOCH_DONE
from raycls.train.run import train
from raycls.train.spec import parse_train_spec
from tests.conftest import AGNEWS_LABELS, REPO, head_train_spec

ray_tests = [pytest.mark.ray, pytest.mark.timeout(600)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- the spec (no Ray) -------------------------------------------------------------------

def test_unknown_spec_key_is_named(tmp_path):
    spec = head_train_spec(tmp_path / "x.jsonl", tmp_path / "out")
    spec["training"]["epochz"] = 2
    with pytest.raises(SpecError, match=r"^training\.epochz: unknown key"):
        parse_train_spec(spec)


def test_data_needs_exactly_one_source(tmp_path):
    spec = head_train_spec(tmp_path / "x.jsonl", tmp_path / "out")
    spec["data"]["from_output"] = str(tmp_path)
    with pytest.raises(SpecError, match="exactly one of data.path"):
        parse_train_spec(spec)


def test_base_model_that_is_not_there_names_what_was_tried(tmp_path):
    with pytest.raises(SpecError, match=r"model\.base_model: 'no/such/model' is not 'minilm', 'e5-small' or 'embedded:gemma3-270m'.*no config.json"):
        resolve_base_model("no/such/model")


def test_base_model_that_transformers_cannot_load_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(SpecError, match=r"model\.base_model: cannot load .* with transformers"):
        check_loadable(str(tmp_path), str(tmp_path))


# --- training (real Ray Train) -------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(600)
def test_full_fine_tune_writes_a_model_transformers_loads(minilm_head):
    from transformers import AutoModelForSequenceClassification

    assert [e["epoch"] for e in minilm_head["curve"]] == [1]
    assert 0.0 <= minilm_head["val_accuracy"] <= 1.0 and minilm_head["curve"][0]["train_loss"] > 0
    data = minilm_head["data"]
    assert data["rows_read"] == 40 and data["rows_used"] == 40 and data["rows_skipped"] == {}
    assert data["rows_train"] + data["rows_validation"] == 40
    assert sum(data["per_class"].values()) == 40 and set(data["per_class"]) == set(AGNEWS_LABELS)
    model_dir = Path(minilm_head["model_dir"])
    assert json.loads((model_dir.parent / "train_metrics.json").read_text())["curve"] == minilm_head["curve"]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert [model.config.id2label[i] for i in range(4)] == AGNEWS_LABELS
    assert (model_dir / "tokenizer.json").exists() or (model_dir / "vocab.txt").exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_lora_on_gemma_exports_merged_weights(tmp_path, ray_local, head_rows):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    spec = head_train_spec(head_rows, tmp_path / "out", model={
        "base_model": "embedded:gemma3-270m", "method": "lora", "max_length": 32, "lora": {"rank": 4, "alpha": 8}})
    metrics = train(parse_train_spec(spec))
    model_dir = Path(metrics["model_dir"])
    names = set()
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    assert names and not any("lora" in n for n in names), "LoRA adapters must be merged into the weights"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert type(model).__name__.startswith("Gemma3") and model.config.num_labels == 4
    assert metrics["method"] == "lora" and len(metrics["curve"]) == 1


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_lora_on_minilm_trains_and_refuses_a_second_run_without_overwrite(tmp_path, ray_local, head_rows):
    spec = parse_train_spec(head_train_spec(head_rows, tmp_path / "out", model={"base_model": "minilm", "method": "lora", "max_length": 32}))
    first = train(spec)
    assert first["method"] == "lora" and Path(first["model_dir"], "config.json").exists()
    with pytest.raises(ResumeError, match="already holds a trained head"):
        train(spec)


# --- data: LLM labels, bad input --------------------------------------------------------------

@pytest.fixture(scope="module")
def head_output(tmp_path_factory, ray_local, minilm_head, head_rows):
    """A finished raycls output: the MiniLM head's labels of the 40 rows plus one empty text."""
    rows = rows_of(head_rows) + [{"id": "empty-1", "text": "", "label": "World"}]
    path = write_rows(tmp_path_factory.mktemp("lab") / "in.jsonl", rows)
    out = tmp_path_factory.mktemp("labelled")
    run_job(parse_spec({"input": {"path": str(path), "id_column": "id", "gold_column": "label"}, "labels": AGNEWS_LABELS,
                        "backend": {"kind": "classifier", "model": minilm_head["model_dir"], "max_length": 32},
                        "output": {"path": str(out)}}))
    return out


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_from_output_keeps_only_rows_above_the_confidence_threshold(tmp_path, head_output):
    table = pq.read_table(head_output / "data")
    confidences = sorted(c for c, e in zip(table.column(schema.CONFIDENCE).to_pylist(), table.column(schema.ERROR).to_pylist()) if e is None)
    threshold = confidences[len(confidences) // 2]
    above = sum(c >= threshold for c in confidences)
    spec = parse_train_spec({**head_train_spec(None, tmp_path / "o"), "data": {
        "from_output": str(head_output), "min_confidence": threshold, "min_rows_per_class": 0}})
    counts = load_data(spec).counts
    assert counts["rows_read"] == 41
    assert counts["rows_used"] == above == counts["rows_train"] + counts["rows_validation"]
    assert counts["rows_skipped"] == {SKIP_ERROR: 1, SKIP_LOW_CONFIDENCE: 40 - above}


@pytest.mark.ray
def test_from_output_that_is_not_a_raycls_output_is_refused(tmp_path, ray_local, head_rows):
    (tmp_path / "data").mkdir()
    spec = parse_train_spec({**head_train_spec(None, tmp_path / "o"), "data": {"from_output": str(tmp_path)}})
    with pytest.raises(InputError, match="not a raycls output: no _raycls_run.json"):
        load_data(spec)


@pytest.mark.ray
def test_unfinished_output_is_refused(tmp_path, ray_local):
    (tmp_path / "_raycls_run.json").write_text(json.dumps({"format": 1, "finished": False}))
    spec = parse_train_spec({**head_train_spec(None, tmp_path / "o"), "data": {"from_output": str(tmp_path)}})
    with pytest.raises(InputError, match="unfinished"):
        load_data(spec)


def _bad_rows(tmp_path, head_rows) -> Path:
    rows = rows_of(head_rows)
    for i in (0, 1, 2):
        rows[i]["label"] = "Weather"
    rows[3]["label"] = "Cooking"
    rows[4]["text"] = "  "
    return write_rows(tmp_path / "bad.jsonl", rows)


@pytest.mark.ray
def test_labels_outside_the_set_stop_the_cli_with_the_count_and_examples(tmp_path, ray_local, head_rows, capsys):
    config = tmp_path / "spec.yaml"
    config.write_text(yaml.safe_dump(head_train_spec(_bad_rows(tmp_path, head_rows), tmp_path / "out")))
    assert raycls_main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raycls: error: ") and "bad.jsonl" in err
    assert "4 row(s) have a label outside labels" in err and "'Weather' (3)" in err and "'Cooking' (1)" in err
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.ray
def test_skipped_unknown_labels_and_empty_texts_are_counted(tmp_path, ray_local, head_rows):
    spec = parse_train_spec(head_train_spec(_bad_rows(tmp_path, head_rows), tmp_path / "out", data={
        "path": str(tmp_path / "bad.jsonl"), "id_column": "id", "label_column": "label", "unknown_labels": "skip"}))
    counts = load_data(spec).counts
    assert counts["rows_read"] == 40 and counts["rows_used"] == 35
    assert counts["rows_skipped"] == {SKIP_UNKNOWN: 4, SKIP_EMPTY: 1}
    assert counts["unknown_label_examples"] == {"Weather": 3, "Cooking": 1}
    assert counts["rows_train"] + counts["rows_validation"] == 35


@pytest.mark.ray
def test_classes_with_too_few_rows_are_named(tmp_path, ray_local, head_rows):
    rows = [r for r in rows_of(head_rows) if r["label"] != "Sports"][:20]
    rows[0]["label"] = "Sports"
    spec = parse_train_spec(head_train_spec(write_rows(tmp_path / "few.jsonl", rows), tmp_path / "out", data={
        "path": str(tmp_path / "few.jsonl"), "id_column": "id", "label_column": "label", "min_rows_per_class": 3}))
    with pytest.raises(InputError, match=r"too few training rows for label\(s\) 'Sports' \(1\).*min_rows_per_class = 3"):
        load_data(spec)


# --- a killed run resumes from its checkpoint ------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(900)
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, ray_local, head_rows):
    from raycls.testing.crashes import own_ray_env

    out = tmp_path / "out"
    spec = head_train_spec(head_rows, out, training={"epochs": 3, "batch_size": 8, "learning_rate": 1e-4})
    config = tmp_path / "spec.yaml"
    config.write_text(yaml.safe_dump(spec))
    log = tmp_path / "first.log"
    ray_tmp = tempfile.mkdtemp(prefix="rtr-", dir="/tmp")
    env = {**own_ray_env(ray_tmp), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(config)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    done_line = re.compile(re.escape(EPOCH_DONE.format(epoch="@", epochs=3)).replace("@", r"(\d+)") + r" (\{.*\})")
    seen: list[dict] = []
    with open(log, "w") as copy:
        for line in job.stdout:  # the job's own log, read as it is written: no sleeps
            copy.write(line)
            match = done_line.search(line)
            if match:
                seen.append(json.loads(match.group(2)))
                os.killpg(job.pid, signal.SIGKILL)
                break
    job.wait(timeout=60)
    assert seen, f"the first attempt never finished an epoch; see {log}"
    assert not (out / "train_metrics.json").exists()

    metrics = train(parse_train_spec(spec))
    curve = metrics["curve"]
    assert [e["epoch"] for e in curve] == [1, 2, 3]
    done = seen[0]["epoch"]
    resumed = [e for e in curve if "resumed_after_epoch" in e]
    if done < 3:  # killed before the last epoch: the rest ran in the second attempt, from the checkpoint
        assert [e["resumed_after_epoch"] for e in resumed] == [done] and resumed[0]["epoch"] == done + 1
    assert curve[done - 1] == seen[0], "the epochs before the kill come from the checkpoint, not retrained"


def test_example_specs_validate():
    from raycls.config import load_spec
    from raycls.train.spec import load_train_spec

    head = load_train_spec(REPO / "jobs" / "configs" / "agnews_head.yaml")
    job = load_spec(REPO / "jobs" / "configs" / "agnews_classifier.yaml")
    assert head.model.base_model == "minilm" and job.backend.kind == "classifier"
    assert job.backend.model == head.output.path.rstrip("/") + "/model" and job.label_names == head.label_names
