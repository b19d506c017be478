"""The vLLM backend's pure steps, without Ray or an engine: planning, rendering, reading outputs.

They run on the embedded model's real tokenizer (converted into `~/.cache/raycls` at setup),
so token ids, budgets and positions are the ones a run uses. Engine outputs are written by
hand in the shape Ray's processor hands to `from_output`: `generated_text`,
`generated_tokens`, and per generated token a `{token id: {"logprob": x}}` map.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from raycls import schema
from raycls.backends.vllm import EnginePlan, _label_position, _tokenizer, from_output, plan_engine, render_batch
from raycls.config import parse_spec
from raycls.prompting.prompts import build_plan

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def engine_for(prompt: str = "basic", labels: list[str] = LABELS, **backend) -> EnginePlan:
    spec = parse_spec({"input": {"path": "rows.jsonl"}, "labels": labels, "prompt": prompt,
                       "output": {"path": "out"}, "backend": {"kind": "vllm", **backend}})
    return plan_engine(spec.backend, build_plan(spec))


@pytest.fixture(scope="module")
def basic() -> EnginePlan:
    return engine_for("basic")


@pytest.fixture(scope="module")
def json_engine() -> EnginePlan:
    return engine_for("json")


def encode(engine: EnginePlan, text: str) -> list[int]:
    return _tokenizer(engine.model_path).encode(text, add_special_tokens=False)


def step(logprobs: dict[int, float]) -> dict[int, dict[str, float]]:
    """One generated token's logprobs, as vLLM reports them."""
    return {token: {"logprob": lp} for token, lp in logprobs.items()}


def label_step(engine: EnginePlan, probs: dict[str, float]) -> dict[int, dict[str, float]]:
    return step({engine.label_tokens[label]: math.log(p) for label, p in probs.items()})


def output_row(text: str, tokens: list[int], logprobs: list, **extra) -> dict:
    """An engine output row for an input row `r1` that kept a `source` column."""
    return {"id": "r1", "source": "feed-a", schema.TEXT: "the match", schema.PROMPT: "prompt",
            schema.TRUNCATED: False, schema.ERROR: None, "generated_text": text, "generated_tokens": tokens,
            "logprobs": logprobs, "num_input_tokens": 42, "num_generated_tokens": len(tokens),
            "prompt": "prompt", "sampling_params": {}, "request_id": 7, "time_taken_llm": 0.1, **extra}


# --- plan_engine --------------------------------------------------------------------------------


def test_a_bare_label_prompt_constrains_the_answer_to_the_labels_behind_the_answer_prefix(basic):
    assert not basic.chat  # the embedded base model has no chat template
    assert basic.choices == tuple(" " + label for label in LABELS)
    assert basic.sampling_params["structured_outputs"] == {"choice": list(basic.choices)}


def test_each_label_is_scored_by_the_first_token_of_its_choice(basic):
    assert basic.label_tokens == {label: encode(basic, " " + label)[0] for label in LABELS}
    assert basic.sampling_params["logprob_token_ids"] == sorted(basic.label_tokens.values())
    assert basic.score_labels


def test_the_default_answer_cap_fits_the_longest_choice(basic):
    longest = max(len(encode(basic, choice)) for choice in basic.choices)
    assert basic.sampling_params["max_tokens"] == longest + 1


def test_an_explicit_max_tokens_is_used_as_given():
    assert engine_for("basic", max_tokens=9).sampling_params["max_tokens"] == 9


def test_a_longer_context_gives_the_text_exactly_that_many_more_tokens(basic):
    assert engine_for("basic", max_model_len=2048).text_budget - basic.text_budget == 2048 - 1024


def test_the_text_budget_leaves_room_for_the_prompt_and_the_answer(basic):
    fixed = len(encode(basic, basic.prompt.fixed_text))
    assert 0 < basic.text_budget <= 1024 - fixed - basic.sampling_params["max_tokens"]


def test_a_json_prompt_constrains_the_label_with_a_schema_enum(json_engine):
    schema_ = json_engine.sampling_params["structured_outputs"]["json"]
    assert schema_["properties"]["label"]["enum"] == LABELS and json_engine.choices == ()
    assert json_engine.label_tokens == {label: encode(json_engine, label)[0] for label in LABELS}


def test_labels_sharing_a_first_token_are_not_told_apart_by_it():
    engine = engine_for("basic", labels=["Sci/Tech", "Sci-Fi"])  # both start with the token " Sci"
    assert engine.label_tokens["Sci/Tech"] == engine.label_tokens["Sci-Fi"] and not engine.score_labels


# --- render_batch -------------------------------------------------------------------------------


def batch_of(texts: list[str | None], truncated: list[bool] | None = None) -> pa.Table:
    return pa.table({schema.ID: [f"r{i}" for i in range(len(texts))], schema.TEXT: pa.array(texts, pa.string()),
                     schema.TRUNCATED: pa.array(truncated or [False] * len(texts), pa.bool_())})


def test_a_short_text_is_rendered_whole_into_the_prompt(basic):
    out = render_batch(batch_of(["a goal in the last minute"]), basic).to_pylist()[0]
    assert out[schema.PROMPT] == basic.prompt.render("a goal in the last minute") and out[schema.TRUNCATED] is False


def test_a_text_over_the_budget_is_cut_to_it_and_flagged(basic):
    long_text = "the match went on and on " * 400
    out = render_batch(batch_of([long_text]), basic).to_pylist()[0]
    kept = out[schema.PROMPT][len(basic.prompt.head): len(out[schema.PROMPT]) - len(basic.prompt.tail)]
    assert out[schema.TRUNCATED] is True and long_text.startswith(kept)
    assert len(encode(basic, kept)) <= basic.text_budget < len(encode(basic, long_text))


def test_a_missing_text_gets_no_prompt_and_keeps_its_flags(basic):
    out = render_batch(batch_of([None, "fine"], truncated=[True, True]), basic).to_pylist()
    assert out[0][schema.PROMPT] is None and [r[schema.TRUNCATED] for r in out] == [True, True]


def test_rendering_keeps_the_rows_and_their_order(basic):
    out = render_batch(batch_of(["one", None, "three"]), basic)
    assert out.column(schema.ID).to_pylist() == ["r0", "r1", "r2"]


# --- _label_position ----------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [
    '{"reasoning":"a","label":"Sports"}',
    '{"reasoning": "a", "label": "Sports"}',
    '{"reasoning":"体育新闻","label":"Sports"}',
], ids=["compact", "spaced", "multibyte-reasoning"])
def test_label_position_is_the_token_that_starts_the_labels_value(json_engine, answer):
    tokens = encode(json_engine, answer)
    position = _label_position({"generated_text": answer, "generated_tokens": tokens}, json_engine)
    tok = _tokenizer(json_engine.model_path)
    assert position is not None and tok.decode(tokens[position:]).startswith("Sports")
    assert tok.decode(tokens[:position]).rstrip().endswith('"')


def test_label_position_is_none_for_an_answer_without_a_label_key(json_engine):
    answer = '{"reasoning":"no idea"}'
    assert _label_position({"generated_text": answer, "generated_tokens": encode(json_engine, answer)}, json_engine) is None


# --- from_output --------------------------------------------------------------------------------


def test_a_bare_label_answer_gets_its_probabilities_from_the_first_step(basic):
    tokens = encode(basic, " Sports")
    row = output_row(" Sports", tokens, [label_step(basic, {"World": 0.1, "Sports": 0.6, "Business": 0.2, "Sci/Tech": 0.1})])
    out = from_output(row, basic)
    assert out[schema.LABEL] == "Sports" and out[schema.ERROR] is None
    assert out[schema.LABEL_PROBS] == pytest.approx({"World": 0.1, "Sports": 0.6, "Business": 0.2, "Sci/Tech": 0.1})
    assert out[schema.CONFIDENCE] == pytest.approx(0.6)


def test_a_bare_label_spelled_through_another_token_becomes_the_most_probable_label(basic):
    """Constrained decoding can reach " Sports" through a shared prefix token; the first-token
    figures say which label the model preferred."""
    row = output_row(" Sports", encode(basic, " Sports"), [label_step(basic, {"World": 0.7, "Sports": 0.3})])
    out = from_output(row, basic)
    assert out[schema.LABEL] == "World" and out[schema.CONFIDENCE] == pytest.approx(0.7)


def test_an_answer_naming_no_label_is_unparseable_with_the_raw_text_kept(basic):
    out = from_output(output_row("I am not sure", encode(basic, "I am not sure"), []), basic)
    assert (out[schema.LABEL], out[schema.ERROR], out[schema.RAW_OUTPUT]) == (None, schema.UNPARSEABLE, "I am not sure")
    assert out[schema.CONFIDENCE] is None and out[schema.LABEL_PROBS] is None


def test_an_empty_answer_is_unparseable(basic):
    out = from_output(output_row("", [], []), basic)
    assert out[schema.LABEL] is None and out[schema.ERROR] == schema.UNPARSEABLE


def test_a_json_answer_reads_probabilities_at_the_labels_token(json_engine):
    answer = '{"reasoning":"a","label":"Sports"}'
    tokens = encode(json_engine, answer)
    position = _label_position({"generated_text": answer, "generated_tokens": tokens}, json_engine)
    logprobs = [label_step(json_engine, {"World": 0.25, "Sports": 0.25, "Business": 0.25, "Sci/Tech": 0.25})] * len(tokens)
    logprobs[position] = label_step(json_engine, {"World": 0.2, "Sports": 0.8})
    out = from_output(output_row(answer, tokens, logprobs), json_engine)
    assert (out[schema.LABEL], out[schema.REASONING]) == ("Sports", "a")
    assert out[schema.CONFIDENCE] == pytest.approx(0.8) and out[schema.LABEL_PROBS]["World"] == pytest.approx(0.2)


def test_a_json_label_written_with_other_tokens_gets_no_probabilities(json_engine):
    """ "Sports" spelled "S" + "ports": its first token is not the label's, so its figures would mislead."""
    head = encode(json_engine, '{"reasoning":"a","label":"')
    tokens = head + encode(json_engine, "S") + encode(json_engine, "ports") + encode(json_engine, '"}')
    answer = _tokenizer(json_engine.model_path).decode(tokens)
    logprobs = [label_step(json_engine, {"World": 0.2, "Sports": 0.8})] * len(tokens)
    out = from_output(output_row(answer, tokens, logprobs), json_engine)
    assert out[schema.LABEL] == "Sports" and out[schema.LABEL_PROBS] is None and out[schema.CONFIDENCE] is None


def test_output_keeps_the_input_columns_and_drops_the_engines(basic):
    out = from_output(output_row(" World", encode(basic, " World"), [label_step(basic, {"World": 1.0})]), basic)
    assert out["id"] == "r1" and out["source"] == "feed-a"
    assert not {"generated_text", "generated_tokens", "logprobs", "prompt", "sampling_params", "request_id",
                "time_taken_llm", schema.TEXT, schema.PROMPT} & set(out)
    assert set(schema.RESULT_COLUMNS) - {schema.MODEL, schema.PROMPT_ID} <= set(out)


def test_output_counts_tokens_and_keeps_the_truncated_flag(basic):
    tokens = encode(basic, " World")
    out = from_output(output_row(" World", tokens, [label_step(basic, {"World": 1.0})], **{schema.TRUNCATED: True}), basic)
    assert (out[schema.INPUT_TOKENS], out[schema.OUTPUT_TOKENS], out[schema.TRUNCATED]) == (42, len(tokens), True)


def labeller_for(**backend):
    from raycls.backends.vllm import VLLMLabeller

    spec = parse_spec({"input": {"path": "rows.jsonl"}, "labels": LABELS, "output": {"path": "out"},
                       "backend": {"kind": "vllm", **backend}})
    return VLLMLabeller(spec, build_plan(spec))


def test_the_fingerprint_is_what_the_engines_are_given_dtype_auto_on_cpus_and_gpus_apart():
    cpu = labeller_for(device="cpu").fingerprint()
    gpu = labeller_for(device="gpu").fingerprint()
    assert cpu["engine_kwargs"]["dtype"] == "float32" and gpu["engine_kwargs"]["dtype"] == "auto"
    assert cpu != gpu  # resume and the cache keep the two engines' labels apart
    assert cpu["sampling_params"]["structured_outputs"] == {"choice": [" World", " Sports", " Business", " Sci/Tech"]}


def test_the_fingerprint_ignores_settings_of_speed_and_follows_those_of_answers():
    base = labeller_for(device="cpu").fingerprint()
    assert labeller_for(device="cpu", engine_kwargs={"max_num_seqs": 8}).fingerprint() == base
    assert labeller_for(device="cpu", max_tokens=64).fingerprint() != base
