"""Calibration and verbalizers: pure functions against hand-computed figures (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raycls import schema
from raycls.quality.calibration import calibrate, finish_batch, finish_row, mean_probs
from raycls.quality.prior import _smallest, check_prior
from raycls.config import parse_spec
from raycls.errors import BackendError, SpecError
from raycls.prompting.prompts import build_plan


def test_calibrate_divides_by_the_prior_and_renormalises():
    # By hand: (0.6/0.5, 0.3/0.3, 0.1/0.2) = (1.2, 1.0, 0.5), sum 2.7 -> (0.4444, 0.3704, 0.1852).
    out = calibrate({"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 0.5, "b": 0.3, "c": 0.2})
    assert out == pytest.approx({"a": 1.2 / 2.7, "b": 1.0 / 2.7, "c": 0.5 / 2.7})


def test_calibration_moves_the_label_off_a_label_the_prior_favours():
    # The model says World 0.5, Sci/Tech 0.2 for every text alike; this row's 0.45 vs 0.35 is
    # a Sci/Tech row once the prior is divided out: 0.45/0.5=0.9 < 0.35/0.2=1.75.
    prior = mean_probs([{"World": 0.55, "Sci/Tech": 0.05}, {"World": 0.45, "Sci/Tech": 0.35}], ["World", "Sci/Tech"])
    assert prior == pytest.approx({"World": 0.5, "Sci/Tech": 0.2})
    label, confidence, probs, raw = finish_row("World", {"World": 0.45, "Sci/Tech": 0.35}, {}, ["World", "Sci/Tech"], prior)
    assert label == "Sci/Tech"
    assert confidence == pytest.approx(1.75 / 2.65)
    assert probs == pytest.approx({"World": 0.9 / 2.65, "Sci/Tech": 1.75 / 2.65})
    assert raw == {"World": 0.45, "Sci/Tech": 0.35}


def test_mean_probs_skips_rows_without_probabilities():
    assert mean_probs([None, {"a": 0.0, "b": 0.0}, {"a": 0.2, "b": 0.8}], ["a", "b"]) == {"a": 0.2, "b": 0.8}
    assert mean_probs([None], ["a", "b"]) is None


def test_finish_maps_answer_words_to_names_without_a_prior():
    name_of = {"Technology": "Sci/Tech", "World": "World"}
    label, confidence, probs, raw = finish_row("Technology", {"World": 0.25, "Technology": 0.75}, name_of, ["World", "Sci/Tech"], None)
    assert (label, confidence, probs, raw) == ("Sci/Tech", 0.75, {"World": 0.25, "Sci/Tech": 0.75}, None)


def test_a_failed_row_keeps_no_label_and_no_probabilities():
    assert finish_row(None, None, {}, ["a", "b"], {"a": 0.5, "b": 0.5}) == (None, None, None, None)


def test_finish_batch_writes_name_keyed_columns():
    batch = pa.table({
        schema.LABEL: ["good", None],
        schema.LABEL_PROBS: pa.array([{"bad": 0.4, "good": 0.6}, None]),
        schema.ERROR: [None, "empty_text"],
    })
    out = finish_batch(batch, {"bad": "negative", "good": "positive"}, ["negative", "positive"], {"negative": 0.2, "positive": 0.8})
    rows = out.to_pylist()
    # 0.4/0.2 = 2 vs 0.6/0.8 = 0.75: negative, 2/2.75.
    assert rows[0][schema.LABEL] == "negative"
    assert rows[0][schema.CONFIDENCE] == pytest.approx(2 / 2.75)
    assert rows[0][schema.LABEL_PROBS_RAW] == {"negative": 0.4, "positive": 0.6}
    assert rows[1][schema.LABEL] is None and rows[1][schema.ERROR] == "empty_text"
    assert out.schema.field(schema.LABEL_PROBS).type == schema.result_schema(["negative", "positive"]).field(schema.LABEL_PROBS).type


def _spec(**changes):
    base = {"input": {"path": "x.jsonl"}, "output": {"path": "o"},
            "labels": [{"name": "World"}, {"name": "Sci/Tech", "answer": "Technology", "description": "science"}]}
    return parse_spec({**base, **changes})


def test_prompts_show_the_answer_words_and_the_plan_maps_them_back():
    spec = _spec(few_shot=[{"text": "New chip", "label": "Sci/Tech"}])
    plan = build_plan(spec)
    assert plan.labels == ("World", "Technology")
    assert plan.label_names == ("World", "Sci/Tech")
    assert "- Technology: science" in plan.head and "Sci/Tech" not in plan.head
    assert "Category: Technology" in plan.head  # the few-shot example answers with the word too
    assert plan.name_of["Technology"] == "Sci/Tech"


def test_the_prompt_id_changes_when_answers_stand_for_other_names():
    plain = build_plan(parse_spec({"input": {"path": "x"}, "output": {"path": "o"}, "labels": ["World", "Technology"]}))
    assert build_plan(_spec()).prompt_id != plain.prompt_id


def test_answers_must_be_unique():
    with pytest.raises(SpecError, match="answers must be unique"):
        _spec(labels=[{"name": "a", "answer": "x"}, {"name": "b", "answer": "x"}])


def test_calibration_accepts_a_bare_method_name_and_names_bad_keys():
    assert _spec(calibration="batch").calibration.method == "batch"
    with pytest.raises(SpecError, match="calibration.method"):
        _spec(calibration={"method": "platt"})


def test_the_batch_sample_is_the_same_rows_whatever_the_order_and_blocks():
    rows = [{schema.ID: f"r{i}", schema.TEXT: f"t{i}"} for i in range(50)]
    whole = _smallest(pa.Table.from_pylist(rows), 8).column(schema.ID).to_pylist()
    # Two blocks in reverse order, each keeping its own 8, then merged: the same 8 rows.
    parts = [_smallest(pa.Table.from_pylist(rows[::-1][:20]), 8), _smallest(pa.Table.from_pylist(rows[::-1][20:]), 8)]
    merged = _smallest(pa.concat_tables(parts), 8).column(schema.ID).to_pylist()
    assert merged == whole and len(set(whole)) == 8


def test_a_prior_that_gives_a_label_no_probability_is_refused_naming_the_label():
    assert check_prior({"World": 0.6, "Sci/Tech": 0.4}, "batch", 64) == {"World": 0.6, "Sci/Tech": 0.4}
    with pytest.raises(BackendError, match=r"gave 'Sci/Tech' no probability on any of the 64 prior rows"):
        check_prior({"World": 0.7, "Sports": 0.3, "Sci/Tech": 0.0}, "batch", 64)
    with pytest.raises(BackendError, match=r"gave 'Sports', 'Sci/Tech' no probability .* never answer them"):
        check_prior({"World": 1.0, "Sports": 0.0, "Sci/Tech": 0.0}, "contextual", 3)
