"""Label parsing and probabilities: tolerant, but never guessing between labels."""

from __future__ import annotations

import math

import pytest

from raycls.prompting.labels import json_schema, label_logprobs_from_tokens, match_label, parse_json_answer, probs_from_logprobs

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.mark.parametrize(
    "answer, label",
    [
        ("Sports", "Sports"),
        ("  sports\n", "Sports"),
        ("SCI/TECH.", "Sci/Tech"),
        ("sci tech", "Sci/Tech"),
        ("Busi", "Business"),
        ("The answer is World.", "World"),
        ("**Sports**", "Sports"),
    ],
)
def test_match_label_is_tolerant(answer, label):
    assert match_label(answer, LABELS).label == label


def test_answer_naming_several_labels_is_multi_label_not_a_guess():
    parsed = match_label("World or Business", LABELS)
    assert parsed.label is None and parsed.multi_label


def test_answer_naming_no_label_is_none():
    parsed = match_label("I cannot tell.", LABELS)
    assert parsed.label is None and not parsed.multi_label


def test_empty_answer_is_none():
    assert match_label("   ", LABELS).label is None


def test_json_answer_with_reasoning():
    parsed = parse_json_answer('{"reasoning": "about a match", "label": "sports"}', LABELS)
    assert parsed.label == "Sports" and parsed.reasoning == "about a match"


def test_json_inside_code_fence_and_prose():
    parsed = parse_json_answer('Sure!\n```json\n{"label": "Business"}\n```', LABELS)
    assert parsed.label == "Business"


def test_json_label_list_with_two_labels_is_multi_label():
    parsed = parse_json_answer('{"label": ["World", "Business"]}', LABELS)
    assert parsed.label is None and parsed.multi_label


def test_truncated_json_falls_back_to_text_matching():
    assert parse_json_answer('{"label": "World', LABELS).label == "World"


def test_whitespace_only_json_answer_is_none():
    assert parse_json_answer("\n\n   \n", LABELS).label is None


def test_json_schema_has_label_enum_and_reasoning_first():
    schema = json_schema(LABELS, reasoning=True)
    assert list(schema["properties"]) == ["reasoning", "label"]
    assert schema["properties"]["label"]["enum"] == LABELS


def test_probabilities_normalise_over_the_labels():
    probs = probs_from_logprobs({"a": math.log(0.3), "b": math.log(0.1), "c": None})
    assert probs["a"] == pytest.approx(0.75) and probs["b"] == pytest.approx(0.25) and probs["c"] == 0.0


def test_labels_sharing_a_first_token_split_its_probability():
    per_label = label_logprobs_from_tokens({7: math.log(0.4), 9: math.log(0.2)}, {"x": 7, "y": 7, "z": 9})
    probs = probs_from_logprobs(per_label)
    assert probs["x"] == pytest.approx(probs["y"]) == pytest.approx(probs["z"])
