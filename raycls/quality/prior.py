"""Measuring the calibration prior: one small pass of the job's own backend, before the main pass.

- `contextual`: the job's prompt on the content-free inputs (`calibration.CONTENT_FREE`).
- `batch`: a fixed sample of the job's input, `calibration.sample_rows` rows: those whose
  id has the smallest hash. A first pass over a fixed sample rather than a running mean,
  because a streaming job that resumes would otherwise label its first rows with a prior
  estimated from fewer rows than its last, and a resumed run with another prior than the
  first attempt: the same row could get two labels. Ids are stable (`raycls.inputs.datasource`), so the
  sample is the same rows whatever the input order, block layout or attempt; picking by
  hash rather than taking the first rows keeps a file sorted by class (THUCNews and
  ChnSentiCorp dev are) from giving a one-class prior. Finding the sample reads the input
  once more (text only, no model calls), which is cheap next to labelling it.

The pass goes through `backend.label` like any rows, so it needs no backend-specific
code: on vLLM it is the same `ray.data.llm` processor over a small Dataset (one engine
start more), on an API a few requests more (counted in the cost). The prior goes to
`metrics.json` (`calibration.prior`), and what the pass cost to `calibration.pass`: with the
response cache on, the main pass takes the sample's answers from the cache, so without it a
first run would report those rows as free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from raycls import schema
from raycls.quality.calibration import CONTENT_FREE, PRIOR_FLOOR, mean_probs, to_names
from raycls.errors import BackendError


@dataclass(frozen=True)
class PriorPass:
    """The prior the calibration pass measured, and what the pass itself cost."""

    probs: dict[str, float]
    """The prior over the label names."""
    rows: int
    """Rows the pass labelled (sample or content-free inputs)."""
    rows_cached: int
    """Of those, rows the response cache answered (no model call)."""
    input_tokens: int
    output_tokens: int

    def report(self) -> dict[str, int]:
        return {"rows": self.rows, "rows_cached": self.rows_cached, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens}


def measure_prior(spec, plan, backend, files=None) -> PriorPass | None:
    """The prior over the label names for `spec.calibration.method` (None for `none`)."""
    import ray.data

    method = spec.calibration.method
    if method == "none":
        return None
    if method == "contextual":
        rows = [{schema.ID: f"_content_free_{i}", schema.TEXT: text, schema.ERROR: None, schema.TRUNCATED: False}
                for i, text in enumerate(CONTENT_FREE)]
        ds = ray.data.from_items(rows)
    else:
        ds = ray.data.from_arrow(sample_rows(spec, files))
    labelled = backend.label(ds).take_all()  # a small sample: every column, whatever the backend gives
    names = list(plan.label_names)
    prior = mean_probs([to_names(r[schema.LABEL_PROBS], plan.name_of, names) for r in labelled], names)
    if prior is None:
        raise BackendError(
            f"calibration: {method} needs label probabilities, and the backend gave none for the "
            f"{len(labelled)} prior rows (an API without logprobs?): set calibration: none"
        )
    answered = [r for r in labelled if not r.get(schema.CACHED)]
    return PriorPass(check_prior(prior, method, len(labelled)), len(labelled), len(labelled) - len(answered),
                     sum(r.get(schema.INPUT_TOKENS) or 0 for r in answered),
                     sum(r.get(schema.OUTPUT_TOKENS) or 0 for r in answered))


def check_prior(prior: dict[str, float], method: str, rows: int) -> dict[str, float]:
    """The prior, unless it gives a label no probability at all: refused before the main pass.

    Such a label is one the model cannot say (an `answer` whose first token it never
    puts mass on, a stale or mismatched verbalizer). Dividing by the floor would push every
    row that scores it at all onto it, and a head trained on these labels would lack the class.
    """
    silent = [name for name, p in prior.items() if p < PRIOR_FLOOR]
    if silent:
        raise BackendError(
            f"calibration: {method}: the model gave {', '.join(map(repr, silent))} no probability on any "
            f"of the {rows} prior rows, so it can never answer {'them' if len(silent) > 1 else 'it'}; give "
            f"each such label an `answer` the model writes (e.g. `answer: Technology` for `Sci/Tech`) "
            f"or set calibration: none"
        )
    return prior


def sample_rows(spec, files=None) -> pa.Table:
    """The `calibration.sample_rows` input rows (with text) whose ids hash smallest."""
    import ray.data

    from raycls.inputs.sources import input_source, resolve_input
    from raycls.job.stages import prepare_batch

    k = spec.calibration.sample_rows
    files = files or resolve_input(spec.input)
    ds = ray.data.read_datasource(input_source(spec.input, files, limit=spec.limit))
    ds = ds.map_batches(prepare_batch, fn_kwargs={"text_template": spec.input.text}, batch_format="pyarrow")
    ds = ds.map_batches(_smallest, fn_kwargs={"k": k}, batch_format="pyarrow", batch_size=4096)
    blocks = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    if not blocks:
        raise BackendError("calibration: batch found no rows with text in the input to estimate the prior from")
    return _smallest(pa.concat_tables(blocks, promote_options="default"), k).drop_columns([_HASH])


_HASH = "_sample_hash"


def _smallest(block: pa.Table, k: int) -> pa.Table:
    """The k rows with text whose id hash is smallest (a block's share of the bottom-k sample)."""
    if _HASH not in block.column_names:
        ids = block.column(schema.ID).to_pylist()
        block = block.append_column(_HASH, pa.array([_id_hash(i) for i in ids], pa.uint64()))
    block = block.filter(pc.is_valid(block.column(schema.TEXT)))
    order = pc.sort_indices(block, sort_keys=[(_HASH, "ascending")])
    return block.take(order[:k])


def _id_hash(row_id: Any) -> int:
    return int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=8).digest(), "big")


def calibration_report(spec, prior: PriorPass | None) -> dict[str, Any]:
    """What `metrics.json` says about calibration: the method, its sample, the prior used and
    what its pass cost (`pass`: rows, rows_cached, input_tokens, output_tokens)."""
    method = spec.calibration.method
    report: dict[str, Any] = {"method": method, "prior": prior.probs if prior else None}
    if prior:
        report["pass"] = prior.report()
    if method == "batch":
        report["sample_rows"] = spec.calibration.sample_rows
    elif method == "contextual":
        report["content_free_inputs"] = list(CONTENT_FREE)
    return report
