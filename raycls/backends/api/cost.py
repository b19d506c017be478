"""The API backend's sizes and dollars: the answer cap, the token budget of a request, the
cost of tokens at the backend's prices, and minutes at the keys' limits (for the dry run)."""

from __future__ import annotations

from typing import Any

from raycls.config import OpenAIConfig
from raycls.prompting.prompts import PromptPlan
from raycls.prompting.tokens import MESSAGE_OVERHEAD_TOKENS, TokenBudget, answer_tokens, estimate_tokens, text_budget


def answer_max_tokens(backend: OpenAIConfig, plan: PromptPlan) -> int:
    """The API answer cap: `backend.max_tokens`, or enough for the answer (estimated)."""
    return answer_tokens(backend.max_tokens, plan, list(plan.labels))


def api_token_budget(backend: OpenAIConfig, plan: PromptPlan) -> TokenBudget:
    """The API backend's budget, estimated; a context too small for the prompt is a SpecError."""
    prompt = estimate_tokens(plan.fixed_text) + MESSAGE_OVERHEAD_TOKENS
    answer = answer_max_tokens(backend, plan)
    return TokenBudget(prompt, answer, text_budget(backend.context_window, prompt, answer, "backend.context_window"))


def cost_usd(backend: OpenAIConfig, input_tokens: int, output_tokens: int) -> float:
    """Dollars for these tokens at the backend's prices."""
    return input_tokens * backend.price_in_per_m / 1e6 + output_tokens * backend.price_out_per_m / 1e6


def cost_metrics(backend: OpenAIConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """`cost_usd` (and the prices it used) for `metrics.json`, from the tokens the output counts."""
    cost = cost_usd(backend, metrics.get("input_tokens", 0), metrics.get("output_tokens", 0))
    return {"cost_usd": round(cost, 6), "price_in_per_m": backend.price_in_per_m, "price_out_per_m": backend.price_out_per_m}


def minutes_at_limits(backend: OpenAIConfig, calls: int, tokens: int) -> float | None:
    """How long the run takes if every key runs at its limits (None when keys cannot be read here)."""
    from raycls.backends.api.keys import resolve_keys
    from raycls.errors import SpecError

    try:
        n = len(resolve_keys(backend.api_keys).values)
    except SpecError:
        return None
    return round(max(calls / (backend.rpm * n), tokens / (backend.tpm * n)), 2)
