"""`--dry-run`: the estimate of a whole run before it starts (rows, calls, tokens), with the
backend's own figures (`Backend.estimate`: the API's cost, `raycls.backends.api.cost`).
Token counting itself lives in `raycls.prompting.tokens`."""

from __future__ import annotations

import functools
import logging
from typing import Any

import pyarrow as pa

from raycls import schema
from raycls.config import JobSpec
from raycls.prompting.tokens import TokenBudget, estimate_tokens

log = logging.getLogger(__name__)

# -- dry run --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def estimate_batch(batch: pa.Table, budget: TokenBudget) -> pa.Table:
    """Per row: input tokens after truncation (exact with the budget's tokenizer, else
    estimated), the output cap, and flags; the same cut the run makes."""
    texts = batch.column(schema.TEXT).to_pylist()
    tok = _tokenizer(budget.tokenizer) if budget.tokenizer else None
    tokens_in, truncated = [], []
    for text in texts:
        if text is None:
            tokens_in.append(0)
            truncated.append(False)
            continue
        n = len(tok.encode(text, add_special_tokens=False)) if tok is not None else estimate_tokens(text)
        cut = budget.text is not None and n > budget.text
        tokens_in.append(budget.prompt + (budget.text if cut else n))
        truncated.append(cut)
    return pa.table({
        "est_input_tokens": pa.array(tokens_in, pa.int64()),
        "est_output_tokens": pa.array([budget.answer if t is not None else 0 for t in texts], pa.int64()),
        "calls": pa.array([int(t is not None) for t in texts], pa.int64()),
        "truncated": pa.array([int(t) for t in truncated], pa.int64()),
    })


def dry_run(spec: JobSpec) -> dict[str, Any]:
    """Read the input, render the prompts and count tokens; calls no model. Prints and returns the estimate.

    Sizes come from the backend's own `token_budget`, so the figures match what the run
    does. Output tokens are counted at the answer cap (`max_tokens`), so the cost is an
    upper bound for answers; re-asks and retries are not included.
    """
    import ray.data

    from raycls.backends import create_backend
    from raycls.inputs.sources import check_input, input_source, resolve_input
    from raycls.job.session import init_ray
    from raycls.job.stages import prepare_batch
    from raycls.prompting.prompts import build_plan

    plan = build_plan(spec)
    files = resolve_input(spec.input)
    check_input(spec.input, files)
    backend = create_backend(spec, plan)
    budget = backend.token_budget()  # a context too small fails here
    init_ray()
    ds = ray.data.read_datasource(input_source(spec.input, files, limit=spec.limit))
    ds = ds.map_batches(prepare_batch, fn_kwargs={"text_template": spec.input.text}, batch_format="pyarrow")
    sample = ds.take(1)
    counted = ds.map_batches(estimate_batch, fn_kwargs={"budget": budget}, batch_format="pyarrow")
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
        "tokens_counted": "exactly" if budget.tokenizer else "estimated",
        "est_input_tokens": est_in,
        "est_output_tokens_max": est_out,
        "est_cost_usd_max": None,
        "sample_prompt": plan.render(sample[0][schema.TEXT]) if sample and sample[0][schema.TEXT] else None,
    }
    result.update(backend.estimate(result["model_calls"], est_in, est_out))  # e.g. the API's cost
    print(format_estimate(result), flush=True)
    return result


def format_estimate(result: dict[str, Any]) -> str:
    lines = [
        f"dry run: {result['rows']} rows, {result['model_calls']} model calls "
        f"({result['rows_empty']} empty, {result['rows_truncated']} truncated)",
        f"tokens ({result['tokens_counted']}): in {result['est_input_tokens']}, out at most {result['est_output_tokens_max']}",
    ]
    if result.get("est_cost_usd_max") is not None:
        sync = result.get("est_cost_usd_max_sync")
        beside = f" at the batch price (synchronous: ${sync:.4f})" if sync is not None else ""
        lines.append(f"estimated cost: at most ${result['est_cost_usd_max']:.4f}{beside}")
    if result.get("est_minutes_at_limits") is not None:
        lines.append(f"at the keys' rpm/tpm limits: about {result['est_minutes_at_limits']} min")
    if result.get("sample_prompt"):
        lines.append("first prompt:\n" + result["sample_prompt"])
    return "\n".join(lines)
