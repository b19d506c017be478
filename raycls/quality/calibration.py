"""Label verbalizers mapped back to names, and calibration of the label probabilities.

Two steps on every labelled batch, after the backend and before the write
(`finish_batch`):

1. **Names.** The model wrote (and was scored on) each label's verbalizer
   (`Label.answer`, e.g. `Technology` for `Sci/Tech`); the output holds the user's names:
   `label`, the keys of `label_probs` and `label_probs_raw`.
2. **Calibration.** Small models put most of their mass on a few labels whatever the
   text (the embedded model gives ` Sci` 0.5% of AG News rows). Both methods divide each
   row's probabilities by a *prior* over the labels and renormalise; the label is the
   argmax of the result and `confidence` its calibrated probability:
   - `contextual` (Zhao et al. 2021): the prior is the mean of what the job's own prompt
     gives content-free inputs (`CONTENT_FREE`);
   - `batch` (Zhou et al., ICLR 2024): the prior is the mean over rows of the job itself.
     The paper writes the decision as argmax(p - prior); we divide instead (the same as
     subtracting in log space), so the calibrated figures stay a distribution that
     `confidence`, ECE and the review queue can use. On the benchmark rows both decisions
     are compared in BENCHMARKS.md.

   The raw probabilities stay in `label_probs_raw`, so the effect can be checked row by row.
   A row without label probabilities (a JSON answer whose label was not spelled with the
   label's own first token, an API without logprobs) keeps its label as answered.

How the prior is measured (a pass of the backend over a few rows) is in
`raycls.quality.prior`; here are only pure functions of probabilities.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa

from raycls import schema

CONTENT_FREE = ("", "N/A", "[MASK]")
"""Inputs that say nothing about any label: what the prompt alone makes the model prefer."""

PRIOR_FLOOR = 1e-6
"""The smallest prior a label gets, so a label the prior never saw is not divided by zero."""


def mean_probs(rows: Sequence[Mapping[str, float] | None], labels: Sequence[str]) -> dict[str, float] | None:
    """The prior: the mean of the rows' label probabilities (rows without any are skipped)."""
    seen = [r for r in rows if r and any(r.get(k) for k in labels)]
    if not seen:
        return None
    return {k: sum(float(r.get(k) or 0.0) for r in seen) / len(seen) for k in labels}


def calibrate(probs: Mapping[str, float], prior: Mapping[str, float]) -> dict[str, float]:
    """`probs / prior`, renormalised to sum to 1 (probabilities that are all 0 stay so).

    Example: probs (0.6, 0.3, 0.1) with prior (0.5, 0.3, 0.2) -> weights (1.2, 1.0, 0.5)
    -> (0.444, 0.370, 0.185).
    """
    weights = {k: float(v or 0.0) / max(float(prior.get(k) or 0.0), PRIOR_FLOOR) for k, v in probs.items()}
    total = sum(weights.values())
    if total <= 0:
        return {k: 0.0 for k in probs}
    return {k: w / total for k, w in weights.items()}


def argmax(probs: Mapping[str, float]) -> str:
    """The most probable label; ties go to the label listed first."""
    return max(probs, key=probs.__getitem__)


def to_names(probs: Mapping[str, float] | None, name_of: Mapping[str, str], names: Sequence[str]) -> dict[str, float] | None:
    """Probabilities keyed by answer words -> keyed by label names, in label order."""
    if probs is None:
        return None
    by_name = {name_of.get(k, k): v for k, v in probs.items()}
    return {name: float(by_name.get(name) or 0.0) for name in names}


def finish_row(
    label: str | None, probs: Mapping[str, float] | None, name_of: Mapping[str, str],
    names: Sequence[str], prior: Mapping[str, float] | None,
) -> tuple[str | None, float | None, dict[str, float] | None, dict[str, float] | None]:
    """(label, confidence, label_probs, label_probs_raw) of one row, in the user's names.

    With a prior, the label is the argmax of the calibrated probabilities; a row whose
    answer did not parse (no label) keeps none; `label_probs_raw` is set only then.
    """
    name = name_of.get(label, label) if label is not None else None
    raw = to_names(probs, name_of, names)
    if raw is None or not any(raw.values()):
        return name, (raw or {}).get(name) if name else None, raw, None
    if prior is None:
        return name, raw.get(name) if name else None, raw, None
    calibrated = calibrate(raw, prior)
    if name is not None:
        name = argmax(calibrated)
    return name, calibrated.get(name) if name else None, calibrated, raw


def finish_batch(batch: pa.Table, name_of: dict[str, str], names: list[str], prior: dict[str, float] | None) -> pa.Table:
    """The names-and-calibration step on a batch of backend output (see the module docstring)."""
    labels = batch.column(schema.LABEL).to_pylist()
    probs = batch.column(schema.LABEL_PROBS).to_pylist() if schema.LABEL_PROBS in batch.column_names else [None] * len(labels)
    done = [finish_row(label, p, name_of, names, prior) for label, p in zip(labels, probs)]
    types = schema.result_schema(names)
    columns: dict[str, list[Any]] = {
        schema.LABEL: [d[0] for d in done],
        schema.CONFIDENCE: [d[1] for d in done],
        schema.LABEL_PROBS: [d[2] for d in done],
        schema.LABEL_PROBS_RAW: [d[3] for d in done],
    }
    for column, values in columns.items():
        array = pa.array(values, types.field(column).type)
        if column in batch.column_names:
            batch = batch.set_column(batch.schema.get_field_index(column), column, array)
        else:
            batch = batch.append_column(column, array)
    return batch


def finish(ds, plan, prior: dict[str, float] | None):
    """The lazy step on the backend's Dataset: answer words -> names, then calibration."""
    return ds.map_batches(
        finish_batch,
        fn_kwargs={"name_of": plan.name_of, "names": list(plan.label_names), "prior": prior},
        batch_format="pyarrow",
    )
