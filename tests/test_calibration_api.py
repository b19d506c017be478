"""One API-backend run (the fault-injection server) with verbalizers, batch calibration and a review queue."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.quality.calibration import calibrate
from raycls.config import parse_spec
from raycls.job.pipeline import run_job
from tests.conftest import UNPACED

pytestmark = pytest.mark.ray

N = 40
WORDS = {"negative": "bad", "positive": "good"}


def _oracle(prompt: str) -> str:
    # A model that says "good" for most texts: only the dirty rooms whose number ends in 0-2 are "bad".
    text = prompt.rsplit("Text:", 1)[-1]
    if "dirty" in text and any(f"review {i}:" in text for i in range(N) if i % 10 < 3):
        return "bad"
    return "good"


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

    tmp = tmp_path_factory.mktemp("calib")
    rows = [{"text": f"review {i}: the room was {'clean' if i % 2 else 'dirty'}", "label": "positive" if i % 2 else "negative"}
            for i in range(N)]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "keys.txt").write_text("sk-fake\n")
    with FakeOpenAI(FakeOpenAIConfig(labels=list(WORDS.values()), oracle=_oracle)) as server:
        spec = parse_spec({
            "input": {"path": str(tmp / "in.jsonl"), "gold_column": "label"},
            "labels": [{"name": n, "answer": w} for n, w in WORDS.items()],
            "calibration": {"method": "batch", "sample_rows": 16},
            "output": {"path": str(tmp / "out"), "review": {"share": 0.25}},
            "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model",
                        "api_keys": [f"file:{tmp / 'keys.txt'}"], "endpoint": "completions", **UNPACED},
        })
        result = run_job(spec)
        requests = server.stats().keys["sk-fake"].accepted
    out = pq.read_table(f"{result.output_path}/data").to_pylist()
    return rows, out, result.metrics, result.output_path, requests


def test_output_holds_the_label_names_not_the_answer_words(run):
    _, out, _, _, _ = run
    assert {r[schema.LABEL] for r in out} <= {"negative", "positive"}
    assert all(set(r[schema.LABEL_PROBS]) == {"negative", "positive"} for r in out)
    assert all(set(r[schema.LABEL_PROBS_RAW]) == {"negative", "positive"} for r in out)
    assert {r[schema.RAW_OUTPUT].strip() for r in out} <= {"bad", "good"}


def test_labels_are_the_argmax_of_the_raw_probabilities_divided_by_the_prior(run):
    rows, out, metrics, _, requests = run
    prior = metrics["calibration"]["prior"]
    assert metrics["calibration"]["method"] == "batch" and prior["positive"] > prior["negative"]
    changed = 0
    for r in out:
        expected = calibrate(r[schema.LABEL_PROBS_RAW], prior)
        assert r[schema.LABEL_PROBS] == pytest.approx(expected)
        assert r[schema.LABEL] == max(expected, key=expected.get)
        assert r[schema.CONFIDENCE] == pytest.approx(expected[r[schema.LABEL]])
        changed += r[schema.LABEL] != max(r[schema.LABEL_PROBS_RAW], key=r[schema.LABEL_PROBS_RAW].get)
    assert changed > 0  # the prior favours "good": some unsure "good" answers become negative
    assert requests == N  # the prior's 16 sample rows are asked once: the main pass takes them from the response cache


def test_the_calibration_pass_tokens_are_counted_though_the_main_pass_takes_its_answers_from_the_cache(run):
    _, out, metrics, _, _ = run
    asked = metrics["calibration"]["pass"]
    assert asked["rows"] == 16 and asked["rows_cached"] == 0
    cached = [r for r in out if r[schema.CACHED]]
    assert len(cached) == metrics["rows_cached"] == 16 and all(r[schema.INPUT_TOKENS] == 0 for r in cached)
    answered = [r for r in out if not r[schema.CACHED] and r[schema.ERROR] is None]
    per_row = sum(r[schema.INPUT_TOKENS] for r in answered) / len(answered)
    assert asked["input_tokens"] == pytest.approx(16 * per_row, rel=0.5) and asked["output_tokens"] > 0


def test_metrics_carry_calibration_error_brier_and_coverage(run):
    _, out, metrics, output, _ = run
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["brier"] <= 2
    assert [c["target"] for c in metrics["coverage"]] == [0.5, 0.8, 0.9, 1.0]
    assert metrics["coverage"][-1]["accuracy"] == pytest.approx(metrics["accuracy"])
    on_disk = json.loads(open(f"{output}/metrics.json").read())
    assert on_disk["ece"] == metrics["ece"] and on_disk["calibration"]["prior"] == metrics["calibration"]["prior"]


def test_the_review_queue_holds_the_least_confident_quarter_most_doubtful_first(run):
    _, out, _, output, _ = run
    review = pq.read_table(f"{output}/review/review.parquet").to_pylist()
    assert len(review) == N // 4
    confidences = [r["confidence"] for r in review]
    assert confidences == sorted(confidences)
    assert max(confidences) <= sorted(r[schema.CONFIDENCE] for r in out)[N // 4 - 1] + 1e-12
    by_id = {r[schema.ID]: r for r in out}
    for line in review:
        row = by_id[line["id"]]
        assert line["text"] == row["text"] and line["label"] == row[schema.LABEL]
        assert line["first_prob"] >= line["second_prob"] and {line["first_label"], line["second_label"]} == {"negative", "positive"}
    with open(f"{output}/review/review.csv", newline="") as f:
        assert [r["id"] for r in csv.DictReader(f)] == [r["id"] for r in review]
