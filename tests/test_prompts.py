"""Prompt rendering: templates, languages, label descriptions, few-shot, ids."""

from __future__ import annotations


import pytest

from raycls.config import parse_spec
from raycls.errors import SpecError
from raycls.prompting.prompts import build_plan, row_text


def spec(**changes):
    base = {"input": {"path": "x.jsonl"}, "labels": ["World", "Sports"], "output": {"path": "o"}}
    return parse_spec({**base, **changes})


def test_basic_prompt_lists_labels_and_ends_with_the_cue():
    plan = build_plan(spec())
    prompt = plan.render("Rain in Spain.")
    assert "- World\n- Sports" in prompt
    assert prompt.endswith("Text: Rain in Spain.\nCategory:")
    assert plan.answer == "label" and plan.answer_prefix == " "


def test_label_descriptions_are_shown():
    plan = build_plan(spec(labels=[{"name": "World", "description": "global news"}, "Sports"]))
    assert "- World: global news" in plan.render("t")


def test_few_shot_examples_come_before_the_text():
    plan = build_plan(spec(few_shot=[{"text": "A goal in extra time.", "label": "Sports"}]))
    prompt = plan.render("Rain in Spain.")
    assert prompt.index("Text: A goal in extra time.\nCategory: Sports") < prompt.index("Text: Rain in Spain.")


def test_json_prompt_shows_examples_as_json():
    plan = build_plan(spec(prompt="json", few_shot=[{"text": "Goal!", "label": "Sports", "reasoning": "football"}]))
    assert plan.expects_json and plan.reasoning
    assert 'JSON: {"reasoning": "football", "label": "Sports"}' in plan.render("t")


def test_reason_prompt_asks_for_reasoning_first():
    prompt = build_plan(spec(prompt="reason")).render("t")
    assert "step by step" in prompt
    assert prompt.index('"reasoning"') < prompt.index('"label"')


def test_chinese_version_is_used_for_language_zh():
    prompt = build_plan(spec(language="zh")).render("今天下雨")
    assert prompt.endswith("文本：今天下雨\n类别：")


def test_custom_instructions_replace_the_default():
    assert build_plan(spec(instructions="Sort the headline.")).render("t").startswith("Sort the headline.")


def test_prompt_id_changes_with_labels_and_template_not_with_text():
    a, b = build_plan(spec()), build_plan(spec(labels=["World", "Sport"]))
    assert a.prompt_id != b.prompt_id
    assert a.prompt_id != build_plan(spec(prompt="json")).prompt_id
    assert a.prompt_id == build_plan(spec()).prompt_id


def test_chat_messages_carry_the_same_prompt():
    plan = build_plan(spec())
    assert plan.messages("t") == [{"role": "user", "content": plan.render("t")}]


def test_custom_template_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text('answer: label\nen:\n  template: "Pick one of {labels} for: {text}\\nAnswer:"\n'
                    "  label_line: '{name}'\n  example: '{text} -> {label}'\n")
    assert build_plan(spec(prompt=str(path))).render("hi") == "Pick one of World\nSports for: hi\nAnswer:"


def test_unknown_template_lists_the_builtins():
    with pytest.raises(SpecError, match=r"expected one of \['basic', 'json', 'reason'\]") as err:
        build_plan(spec(prompt="fancy"))
    assert err.value.key == "prompt"


def test_template_without_text_slot_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("answer: label\nen:\n  template: 'no slot'\n  label_line: '{name}'\n  example: ''\n")
    with pytest.raises(SpecError, match=r"\{text\} exactly once"):
        build_plan(spec(prompt=str(path)))


def test_row_text_from_a_column_or_a_template():
    assert row_text("body", {"body": "x"}) == "x"
    assert row_text("{title}. {body}", {"title": "T", "body": "B"}) == "T. B"
    assert row_text("{title}. {body}", {"title": None, "body": "B"}) == ". B"
    assert row_text("{title}. {body}", {"title": None, "body": None}) is None
    assert row_text("body", {"body": None}) is None
