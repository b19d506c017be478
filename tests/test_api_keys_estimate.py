"""API key references and the token/cost estimates (no Ray, no server)."""

from __future__ import annotations

import pytest

from raycls.backends.api.keys import resolve_keys
from raycls.config import OpenAIConfig, parse_spec
from raycls.errors import SpecError
from raycls.backends.api.cost import api_token_budget, cost_metrics
from raycls.prompting.tokens import estimate_tokens, truncate_to_tokens
from raycls.prompting.prompts import build_plan

SECRET = "sk-SECRET-CANARY-1234"


def test_env_reference_may_hold_several_keys():
    keys = resolve_keys(["env:KEYS"], {"KEYS": "sk-a, sk-b,sk-c"})
    assert keys.values == ("sk-a", "sk-b", "sk-c")
    assert keys.labels[1] == "key#1 (env:KEYS[1])"


def test_file_reference_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nsk-a\n\nsk-b\n")
    assert resolve_keys([f"file:{path}"]).values == ("sk-a", "sk-b")


def test_a_duplicate_key_is_used_once():
    keys = resolve_keys(["env:A", "env:B"], {"A": "sk-a", "B": "sk-a,sk-b"})
    assert keys.values == ("sk-a", "sk-b")


def test_missing_variable_names_the_spec_key_and_the_variable():
    with pytest.raises(SpecError) as err:
        resolve_keys(["env:A", "env:NOPE"], {"A": "sk-a"})
    assert err.value.key == "backend.api_keys[1]" and "NOPE" in str(err.value)


def test_missing_key_file_names_the_path(tmp_path):
    with pytest.raises(SpecError, match="missing.txt"):
        resolve_keys([f"file:{tmp_path / 'missing.txt'}"])


def test_keys_never_show_in_repr():
    keys = resolve_keys(["env:A"], {"A": SECRET})
    assert SECRET not in repr(keys) and SECRET not in str(keys)


def test_redact_replaces_keys_with_their_labels():
    keys = resolve_keys(["env:A"], {"A": SECRET})
    assert keys.redact(f"bad key {SECRET}!") == "bad key <key#0>!"


def test_a_literal_key_in_the_spec_is_refused_without_echoing_it():
    with pytest.raises(SpecError) as err:
        parse_spec({"input": {"path": "x.jsonl"}, "labels": ["a", "b"], "output": {"path": "/tmp/o"},
                    "backend": {"kind": "openai", "base_url": "http://h/v1", "model": "m", "api_keys": [SECRET]}})
    assert "api_keys" in err.value.key and SECRET not in str(err.value)


def test_estimate_counts_cjk_characters_one_each():
    assert estimate_tokens("abcdefgh") == 2 and estimate_tokens("酒店很好") == 4


def test_truncate_keeps_text_that_fits():
    assert truncate_to_tokens("short text", 100) == ("short text", False)


def test_truncate_cuts_to_the_budget():
    text, cut = truncate_to_tokens("房间" * 100, 50)
    assert cut and estimate_tokens(text) <= 50 and text == "房间" * 25


def spec_with(**backend):
    return parse_spec({
        "input": {"path": "x.jsonl"}, "labels": ["a", "b"], "output": {"path": "/tmp/o"},
        "backend": {"kind": "openai", "base_url": "http://h/v1", "model": "m", "api_keys": ["env:K"], **backend},
    })


def test_text_budget_leaves_room_for_prompt_and_answer():
    spec = spec_with(context_window=512, max_tokens=16)
    budget = api_token_budget(spec.backend, build_plan(spec))
    assert budget.answer == 16 and budget.text == 512 - budget.prompt - 16 - 8


def test_a_context_too_small_for_the_prompt_names_the_key():
    spec = spec_with(context_window=64, max_tokens=60)
    with pytest.raises(SpecError) as err:
        api_token_budget(spec.backend, build_plan(spec))
    assert err.value.key == "backend.context_window"


def test_cost_from_tokens_and_prices():
    spec = spec_with(price_in_per_m=2.0, price_out_per_m=8.0)
    assert isinstance(spec.backend, OpenAIConfig)
    assert cost_metrics(spec.backend, {"input_tokens": 1_000_000, "output_tokens": 500_000})["cost_usd"] == pytest.approx(6.0)
