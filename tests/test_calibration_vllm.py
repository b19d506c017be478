"""Verbalizers and contextual calibration on the real vLLM engine (CPU build) and the embedded model.

One job: 12 AG News rows, `Sci/Tech` answered as `Technology`, the prior measured on
content-free inputs through the same `ray.data.llm` processor (a second engine start).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.quality.calibration import calibrate
from raycls.config import parse_spec
from raycls.job.pipeline import run_job

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(900)]

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_local):
    from tests.conftest import DATASETS

    rows = pq.read_table(DATASETS / "agnews_dev.parquet").slice(0, 12).to_pylist()
    path = tmp_path_factory.mktemp("in") / "agnews12.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path_factory.mktemp("out")
    spec = parse_spec({
        "input": {"path": str(path), "id_column": "id", "gold_column": "label"},
        "labels": ["World", "Sports", "Business", {"name": "Sci/Tech", "answer": "Technology"}],
        "instructions": "Classify the news article by topic.",
        "calibration": "contextual",
        "backend": {"kind": "vllm", "max_model_len": 512, "batch_size": 8},
        "output": {"path": str(out)},
    })
    run_job(spec)
    return pq.read_table(out / "data").to_pylist(), json.loads((out / "metrics.json").read_text())


def test_the_output_holds_names_and_the_model_wrote_the_answer_word(job):
    out, _ = job
    assert {r[schema.LABEL] for r in out} <= set(NAMES)
    assert all(list(r[schema.LABEL_PROBS]) == NAMES for r in out)
    # The engine writes answer words (constrained decoding can stop inside one, e.g. "Techn",
    # when it spells the word with more tokens than the word's own: the parser's unique prefix).
    words = ("World", "Sports", "Business", "Technology")
    raws = [r[schema.RAW_OUTPUT].strip() for r in out]
    assert all(raw and any(w.startswith(raw) for w in words) for raw in raws)
    assert "Sci/Tech" not in " ".join(raws)


def test_labels_are_the_argmax_of_raw_probabilities_over_the_content_free_prior(job):
    out, metrics = job
    prior = metrics["calibration"]["prior"]
    assert metrics["calibration"]["method"] == "contextual" and sum(prior.values()) == pytest.approx(1.0)
    for r in out:
        expected = calibrate(r[schema.LABEL_PROBS_RAW], prior)
        assert r[schema.LABEL_PROBS] == pytest.approx(expected)
        assert r[schema.LABEL] == max(expected, key=expected.get)
