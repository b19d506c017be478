"""The review queue's selection and ordering (no Ray); the end-to-end run is in test_calibration_api."""

from __future__ import annotations

import pyarrow as pa

from raycls import schema
from raycls.quality.review import output_text, review_rows, select


def _block():
    probs = [{"a": 0.9, "b": 0.1}, {"a": 0.55, "b": 0.45}, {"a": 0.3, "b": 0.7}, None, {"a": 0.52, "b": 0.48}]
    return pa.Table.from_pylist([
        {schema.ID: f"r{i}", "title": f"t{i}", "body": None if i == 2 else f"b{i}",
         schema.LABEL: None if p is None else max(p, key=p.get), schema.CONFIDENCE: None if p is None else max(p.values()),
         schema.LABEL_PROBS: p, schema.ERROR: "unparseable_output" if p is None else None}
        for i, p in enumerate(probs)
    ])


def test_below_keeps_rows_under_the_threshold_and_failed_rows_most_doubtful_first():
    lines = review_rows(_block(), "{title}: {body}", below=0.6, keep=None).to_pylist()
    assert [r["id"] for r in lines] == ["r3", "r4", "r1"]  # the failed row, then 0.52, then 0.55
    assert lines[1]["text"] == "t4: b4"
    assert (lines[1]["first_label"], lines[1]["first_prob"], lines[1]["second_label"], lines[1]["second_prob"]) == ("a", 0.52, "b", 0.48)
    assert lines[0]["error"] == "unparseable_output" and lines[0]["first_label"] is None


def test_share_keeps_the_k_most_doubtful_across_blocks():
    block = _block()
    parts = [review_rows(block.slice(0, 2), "title", below=None, keep=2), review_rows(block.slice(2), "title", below=None, keep=2)]
    merged = select(pa.concat_tables(parts), below=None, keep=2).to_pylist()
    assert [r["id"] for r in merged] == ["r3", "r4"]


def test_equal_confidence_puts_the_smaller_lead_first():
    t = pa.Table.from_pylist([
        {"id": "x", "text": None, "label": "a", "confidence": 0.5, "first_label": "a", "first_prob": 0.5,
         "second_label": "b", "second_prob": 0.1, "error": None},
        {"id": "y", "text": None, "label": "a", "confidence": 0.5, "first_label": "a", "first_prob": 0.5,
         "second_label": "b", "second_prob": 0.45, "error": None},
    ])
    assert [r["id"] for r in select(t, below=None, keep=2).to_pylist()] == ["y", "x"]


def test_the_text_is_the_input_template_over_the_kept_columns():
    assert output_text("{title}. {description}", {"title": "Chip", "description": "faster"}) == "Chip. faster"
    assert output_text("{title}. {description}", {"title": "Chip"}) == "Chip. "  # description not kept
    assert output_text("text", {"id": "1"}) is None
    assert output_text("label", {"input_label": "gold text"}) == "gold text"  # a clashing column's stored name
