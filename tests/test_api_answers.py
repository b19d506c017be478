"""The API backend's pure parts: request shapes, reading answers, confidence from top_logprobs."""

from __future__ import annotations

import math

import pytest

from raycls.backends.api.answers import RequestPlan, error_summary, fallback, label_probs, read_answer, rejects
from raycls.backends.api.http import ApiStatusError
from raycls.config import OpenAIConfig, parse_spec
from raycls.prompting.prompts import build_plan

LABELS = ["positive", "negative"]


def plan_for(prompt: str = "basic", **backend) -> RequestPlan:
    spec = parse_spec({
        "input": {"path": "x.jsonl"},
        "labels": LABELS,
        "prompt": prompt,
        "output": {"path": "/tmp/out"},
        "backend": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "api_keys": ["env:K"], **backend},
    })
    assert isinstance(spec.backend, OpenAIConfig)
    return RequestPlan.build(spec.backend, build_plan(spec))


def chat_response(content: str, tokens: list[tuple[str, list[tuple[str, float]]]] | None = None) -> dict:
    """A chat completion body as an OpenAI-compatible server sends it."""
    logprobs = None
    if tokens is not None:
        logprobs = {"content": [
            {"token": t, "logprob": alts[0][1], "bytes": None,
             "top_logprobs": [{"token": a, "logprob": lp, "bytes": None} for a, lp in alts]}
            for t, alts in tokens
        ]}
    return {
        "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32},
    }


def test_json_prompt_on_chat_asks_for_a_json_schema_with_the_label_enum():
    rp = plan_for("json")
    kwargs = rp.request("great hotel", rp.first_format(), logprobs=False, reasks=[])
    schema = kwargs["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == LABELS


def test_label_prompt_on_chat_sends_plain_text():
    rp = plan_for("basic")
    kwargs = rp.request("great hotel", rp.first_format(), logprobs=True, reasks=[])
    assert "response_format" not in kwargs and kwargs["top_logprobs"] == 5


def test_json_object_mode_on_a_label_prompt_says_json_in_the_messages():
    rp = plan_for("basic", response_format="json_object")
    kwargs = rp.request("great hotel", "json_object", logprobs=False, reasks=[])
    assert kwargs["response_format"] == {"type": "json_object"}
    assert "JSON" in kwargs["messages"][0]["content"]


def test_formats_fall_back_from_schema_to_json_mode_to_text():
    assert [fallback("json_schema"), fallback("json_object"), fallback("none")] == ["json_object", "none", None]


def test_choice_on_completions_constrains_through_structured_outputs_after_the_answer_cue():
    rp = plan_for("basic", endpoint="completions", response_format="choice")
    kwargs = rp.request("great hotel", "choice", logprobs=True, reasks=[])
    assert rp.path == "/completions" and kwargs["structured_outputs"] == {"choice": LABELS}
    assert kwargs["prompt"].endswith("Category: ") and kwargs["logprobs"] == 5


def test_reask_on_chat_shows_the_bad_answer_and_asks_again():
    rp = plan_for("basic")
    messages = rp.request("great hotel", "none", logprobs=False, reasks=["maybe"])["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "maybe" and "positive, negative" in messages[2]["content"]


def test_reask_on_completions_samples_differently():
    rp = plan_for("basic", endpoint="completions")
    assert rp.request("x", "none", logprobs=False, reasks=["maybe"])["temperature"] > 0


def test_default_answer_cap_fits_a_label_and_grows_for_reasoning():
    assert plan_for("basic").max_tokens < plan_for("reason").max_tokens


def test_read_answer_takes_text_usage_and_alternatives_from_chat():
    answer = read_answer(chat_response("positive", [("positive", [("positive", -0.1), ("negative", -2.4)])]), chat=True)
    assert (answer.text, answer.input_tokens, answer.output_tokens) == ("positive", 30, 2)
    assert answer.tokens[0][1][1] == ("negative", -2.4)


def test_read_answer_from_a_completion_with_logprobs():
    response = {
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": " negative", "finish_reason": "stop",
                     "logprobs": {"tokens": [" negative"], "token_logprobs": [-0.2],
                                  "top_logprobs": [{" negative": -0.2, " positive": -1.8}], "text_offset": [0]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }
    answer = read_answer(response, chat=False)
    probs = label_probs(answer, LABELS, as_json=False)
    assert probs["negative"] == pytest.approx(math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.8)))


def test_label_probs_for_a_bare_label():
    answer = read_answer(chat_response("positive", [("positive", [("positive", math.log(0.6)), ("negative", math.log(0.2))])]), chat=True)
    assert label_probs(answer, LABELS, as_json=False) == pytest.approx({"positive": 0.75, "negative": 0.25})


def test_label_probs_add_up_tokens_that_start_the_same_label():
    alts = [("Pos", math.log(0.3)), (" positive", math.log(0.3)), ("negative", math.log(0.2))]
    answer = read_answer(chat_response("Positive", [("Pos", alts), ("itive", [("itive", 0.0)])]), chat=True)
    assert label_probs(answer, LABELS, as_json=False)["positive"] == pytest.approx(0.75)


def test_label_probs_read_the_token_where_the_json_label_value_starts():
    tokens = [('{"reasoning": "nice", "label": "', [('{"reasoning": "nice", "label": "', 0.0)]),
              ("negative", [("negative", math.log(0.9)), ("positive", math.log(0.1))]),
              ('"}', [('"}', 0.0)])]
    content = "".join(t for t, _ in tokens)
    answer = read_answer(chat_response(content, tokens), chat=True)
    assert label_probs(answer, LABELS, as_json=True) == pytest.approx({"negative": 0.9, "positive": 0.1})


def test_label_probs_none_without_logprobs():
    assert label_probs(read_answer(chat_response("positive"), chat=True), LABELS, as_json=False) is None


def test_label_probs_none_when_no_alternative_names_a_label():
    answer = read_answer(chat_response("Sure", [("Sure", [("Sure", -0.1), ("Well", -1.0)])]), chat=True)
    assert label_probs(answer, LABELS, as_json=False) is None


def test_parse_uses_json_for_json_formats_and_the_tolerant_parser_otherwise():
    rp = plan_for("basic")
    assert rp.parse('{"label": "negative"}', "json_object").label == "negative"
    assert rp.parse("  Positive.", "none").label == "positive"


def test_400_messages_are_classified():
    assert rejects("response_format json_schema is not supported", "format")
    assert rejects("This model's maximum context length is 512 tokens", "too_long")
    assert rejects("logprobs are not supported", "logprobs")
    assert not rejects("temperature must be at most 2", "format")


def test_read_answer_refuses_a_body_of_another_shape():
    from raycls.backends.api.answers import MalformedAnswer

    with pytest.raises(MalformedAnswer):
        read_answer({"choices": [{"message": {"content": ["not", "text"]}}]}, chat=True)


def test_error_summary_never_repeats_the_server_message():
    exc = ApiStatusError(401, {"message": "bad key sk-SECRET-123", "code": "invalid_api_key"}, {})
    summary = error_summary(exc)
    assert "SECRET" not in summary and "401" in summary and "invalid_api_key" in summary


def _bad_request(message: str, status: int = 400) -> ApiStatusError:
    return ApiStatusError(status, {"message": message, "type": "invalid_request_error"}, {})


def test_error_summary_keeps_a_bad_requests_reason():
    assert error_summary(_bad_request("model 'gpt-x' does not exist")).endswith("model 'gpt-x' does not exist")


def test_error_summary_masks_key_shaped_words_in_a_bad_requests_reason():
    summary = error_summary(_bad_request("invalid header for sk-SECRET-123456"))
    assert "SECRET" not in summary and "<redacted>" in summary
