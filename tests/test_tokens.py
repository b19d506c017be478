"""One token budget for the vLLM backend, the API backend and `--dry-run`."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.backends import create_backend
from raycls.config import parse_spec
from raycls.errors import SpecError
from raycls.job.estimate import dry_run
from raycls.job.pipeline import run_job
from raycls.prompting.prompts import build_plan
from raycls.prompting.tokens import REASONING_MAX_TOKENS, SAFETY_TOKENS, text_budget
from tests.conftest import api_spec, review_rows

KEYS = ["sk-tok-A"]


def vllm_spec(tmp_path, rows: list[dict], **backend):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return parse_spec({"input": {"path": str(data)}, "labels": ["negative", "positive"], "prompt": "json",
                       "output": {"path": str(tmp_path / "out")}, "backend": {"kind": "vllm", **backend}})


def test_the_text_gets_what_the_prompt_answer_and_slack_leave():
    assert text_budget(512, prompt=100, answer=20, key="k") == 512 - 100 - 20 - SAFETY_TOKENS


def test_no_context_window_means_no_cut():
    assert text_budget(None, prompt=100, answer=20, key="k") is None


def test_a_context_too_small_is_a_spec_error_with_the_numbers():
    with pytest.raises(SpecError) as err:
        text_budget(120, prompt=100, answer=20, key="backend.max_model_len")
    assert err.value.key == "backend.max_model_len"
    assert "120 leaves -8 tokens for the text (the prompt takes 100, the answer up to 20" in str(err.value)


def test_a_vllm_context_too_small_for_the_prompt_is_a_spec_error_not_a_traceback(tmp_path):
    spec = vllm_spec(tmp_path, [{"text": "x"}], max_model_len=64)
    with pytest.raises(SpecError) as err:
        create_backend(spec, build_plan(spec)).token_budget()
    assert err.value.key == "backend.max_model_len"


def test_the_vllm_answer_cap_for_reasoning_json_is_the_apis(tmp_path):
    spec = vllm_spec(tmp_path, [{"text": "x"}])
    budget = create_backend(spec, build_plan(spec)).token_budget()
    assert budget.answer == REASONING_MAX_TOKENS and budget.tokenizer is not None  # counted exactly


@pytest.mark.ray
def test_a_vllm_dry_run_counts_exactly_and_truncates_like_the_run(tmp_path, ray_local):
    long = "the room was clean and the staff were kind " * 40
    spec = vllm_spec(tmp_path, [{"text": long}, {"text": "short"}, {"text": ""}], max_model_len=400)
    budget = create_backend(spec, build_plan(spec)).token_budget()
    result = dry_run(spec)
    assert result["tokens_counted"] == "exactly"
    assert result["rows_truncated"] == 1 and result["model_calls"] == 2
    assert result["est_output_tokens_max"] == 2 * REASONING_MAX_TOKENS
    assert result["est_input_tokens"] > budget.prompt + budget.text  # the long row counts its full budget


@pytest.mark.ray
def test_an_api_dry_run_flags_the_rows_the_run_truncates(tmp_path, ray_local, fake_openai):
    server = fake_openai(keys=KEYS, labels=["negative", "positive"])
    rows = review_rows(12)
    for i in (1, 5, 8):
        rows[i]["text"] = "the corridor was long and very noisy at night " * 30
    spec = api_spec(tmp_path, server.base_url, rows, KEYS, context_window=256, max_tokens=16)
    estimate = dry_run(spec)
    result = run_job(spec)
    out = pq.read_table(f"{result.output_path}/data").to_pylist()
    assert estimate["rows_truncated"] == sum(bool(r[schema.TRUNCATED]) for r in out) == 3
