"""Tokens and dollars: a cheap token estimate, truncation to fit, cost, and `--dry-run`.

API callers have no tokenizer for the provider's model, and must not need one: the
estimate is about 4 characters per token for ASCII text and one token per other
character (CJK text runs close to that). It errs high for both, which is the safe side
for rate-limit reservations and for a cost estimate given before a run; the server's
reported usage replaces it once a request is answered.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pyarrow as pa

from raycls import schema
from raycls.config import JobSpec, OpenAIBackend
from raycls.prompts import PromptPlan

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat message costs beyond its content (role and separators)."""
LABEL_MAX_TOKENS = 16
"""Default answer cap when the model answers with the bare label."""
JSON_MAX_TOKENS = 64
"""Default answer cap for a JSON answer without reasoning."""
REASONING_MAX_TOKENS = 256
"""Default answer cap for a JSON answer with a short reasoning first."""


def estimate_tokens(text: str) -> int:
    """Tokens in `text`, estimated high: ASCII at 4 characters per token, anything else 1 each."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


def truncate_to_tokens(text: str, budget: int) -> tuple[str, bool]:
    """Cut `text` so that `estimate_tokens` of it stays within `budget`; returns (text, was_cut)."""
    if estimate_tokens(text) <= budget:
        return text, False
    cost, limit = 0.0, max(0, budget)
    for i, ch in enumerate(text):
        cost += 0.25 if ord(ch) < 128 else 1.0
        if math.ceil(cost) > limit:
            return text[:i], True
    return text, False


def answer_max_tokens(backend: OpenAIBackend, plan: PromptPlan) -> int:
    """`backend.max_tokens`, or enough for the answer the prompt asks for."""
    if backend.max_tokens:
        return backend.max_tokens
    if not plan.expects_json:
        return max(LABEL_MAX_TOKENS, max(estimate_tokens(label) for label in plan.labels) + 4)
    return REASONING_MAX_TOKENS if plan.reasoning else JSON_MAX_TOKENS


def text_budget(backend: OpenAIBackend, plan: PromptPlan) -> int | None:
    """Tokens left for a row's text within `backend.context_window`, or None when unbounded."""
    if backend.context_window is None:
        return None
    fixed = estimate_tokens(plan.fixed_text) + MESSAGE_OVERHEAD_TOKENS + 8
    budget = backend.context_window - fixed - answer_max_tokens(backend, plan)
    if budget < 16:
        from raycls.errors import SpecError

        raise SpecError(
            "backend.context_window",
            f"{backend.context_window} leaves {budget} tokens for the text (the prompt takes ~{fixed}, "
            f"the answer up to {answer_max_tokens(backend, plan)}); raise it or lower backend.max_tokens",
        )
    return budget


def cost_usd(backend: Any, input_tokens: int, output_tokens: int) -> float | None:
    """Dollars for these tokens at the backend's prices; None for backends without prices."""
    if not isinstance(backend, OpenAIBackend):
        return None
    return input_tokens * backend.price_in_per_m / 1e6 + output_tokens * backend.price_out_per_m / 1e6


def cost_metrics(spec: JobSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    """`cost_usd` (and the prices it used) for `metrics.json`, from the tokens the output counts."""
    cost = cost_usd(spec.backend, metrics.get("input_tokens", 0), metrics.get("output_tokens", 0))
    if cost is None:
        return {}
    backend: OpenAIBackend = spec.backend  # type: ignore[assignment]
    return {
        "cost_usd": round(cost, 6),
        "price_in_per_m": backend.price_in_per_m,
        "price_out_per_m": backend.price_out_per_m,
    }


# -- dry run --------------------------------------------------------------------------------


def estimate_batch(batch: pa.Table, plan: PromptPlan, budget: int | None, max_out: int) -> pa.Table:
    """Per row: estimated input tokens (after truncation), the output cap, and flags."""
    fixed = estimate_tokens(plan.fixed_text) + MESSAGE_OVERHEAD_TOKENS
    texts = batch.column(schema.TEXT).to_pylist()
    tokens_in, tokens_out, truncated = [], [], []
    for text in texts:
        if text is None:
            tokens_in.append(0)
            tokens_out.append(0)
            truncated.append(False)
            continue
        cut, was_cut = truncate_to_tokens(text, budget) if budget is not None else (text, False)
        tokens_in.append(fixed + estimate_tokens(cut))
        tokens_out.append(max_out)
        truncated.append(was_cut)
    return pa.table({
        "est_input_tokens": pa.array(tokens_in, pa.int64()),
        "est_output_tokens": pa.array(tokens_out, pa.int64()),
        "calls": pa.array([int(t is not None) for t in texts], pa.int64()),
        "truncated": pa.array([int(t) for t in truncated], pa.int64()),
    })


def dry_run(spec: JobSpec) -> dict[str, Any]:
    """Read the input, render the prompts and count tokens; calls no model. Prints and returns the estimate.

    Output tokens are counted at the answer cap (`max_tokens`), so the cost is an upper
    bound for answers; re-asks and retries are not included.
    """
    import ray
    import ray.data

    from raycls.io import InputDatasource, check_input, resolve_input
    from raycls.pipeline import prepare_batch
    from raycls.prompts import build_plan

    plan = build_plan(spec)
    files = resolve_input(spec.input)
    check_input(spec.input, files)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    backend = spec.backend
    if isinstance(backend, OpenAIBackend):
        budget, max_out = text_budget(backend, plan), answer_max_tokens(backend, plan)
    else:
        budget, max_out = None, getattr(backend, "max_tokens", None) or LABEL_MAX_TOKENS  # a classifier has none
    ds = ray.data.read_datasource(InputDatasource(spec.input, files))
    if spec.limit:
        ds = ds.limit(spec.limit)
    ds = ds.map_batches(prepare_batch, fn_kwargs={"text_template": spec.input.text}, batch_format="pyarrow")
    sample = ds.take(1)
    counted = ds.map_batches(estimate_batch, fn_kwargs={"plan": plan, "budget": budget, "max_out": max_out}, batch_format="pyarrow")
    from ray.data.aggregate import Count, Sum

    totals = counted.aggregate(Count(), Sum("est_input_tokens"), Sum("est_output_tokens"), Sum("calls"), Sum("truncated"))
    rows = int(totals["count()"])
    est_in = int(totals["sum(est_input_tokens)"] or 0)
    est_out = int(totals["sum(est_output_tokens)"] or 0)
    result: dict[str, Any] = {
        "rows": rows,
        "model_calls": int(totals["sum(calls)"] or 0),
        "rows_empty": rows - int(totals["sum(calls)"] or 0),
        "rows_truncated": int(totals["sum(truncated)"] or 0),
        "est_input_tokens": est_in,
        "est_output_tokens_max": est_out,
        "est_cost_usd_max": None,
        "sample_prompt": plan.render(sample[0][schema.TEXT]) if sample and sample[0][schema.TEXT] else None,
    }
    if isinstance(backend, OpenAIBackend):
        result["est_cost_usd_max"] = round(cost_usd(backend, est_in, est_out) or 0.0, 6)
        result["est_minutes_at_limits"] = _minutes_at_limits(backend, result["model_calls"], est_in + est_out)
    print(format_estimate(result), flush=True)
    return result


def _minutes_at_limits(backend: OpenAIBackend, calls: int, tokens: int) -> float | None:
    """How long the run takes if every key runs at its limits (None when keys cannot be read here)."""
    from raycls.backends.api_keys import resolve_keys
    from raycls.errors import SpecError

    try:
        n = len(resolve_keys(backend.api_keys).values)
    except SpecError:
        return None
    return round(max(calls / (backend.rpm * n), tokens / (backend.tpm * n)), 2)


def format_estimate(result: dict[str, Any]) -> str:
    lines = [
        f"dry run: {result['rows']} rows, {result['model_calls']} model calls "
        f"({result['rows_empty']} empty, {result['rows_truncated']} truncated)",
        f"estimated tokens: in {result['est_input_tokens']}, out at most {result['est_output_tokens_max']}",
    ]
    if result.get("est_cost_usd_max") is not None:
        lines.append(f"estimated cost: at most ${result['est_cost_usd_max']:.4f}")
    if result.get("est_minutes_at_limits") is not None:
        lines.append(f"at the keys' rpm/tpm limits: about {result['est_minutes_at_limits']} min")
    if result.get("sample_prompt"):
        lines.append("first prompt:\n" + result["sample_prompt"])
    return "\n".join(lines)
