"""The metrics reduction: counts of (gold, predicted) across the cluster, then scikit-learn.

Grouping by the pair reduces any number of rows to at most (labels + 1)² counts; handing
the unique pairs to scikit-learn with the counts as `sample_weight` gives exactly the
figures it would give on the full arrays.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from raycls import schema
from raycls.quality.calibration_metrics import format_calibration, reduce_calibration
from raycls.errors import shorten

NO_LABEL = "<none>"
"""The predicted class of a row that got no label (an error): it counts as wrong."""


def scores_from_counts(pairs: list[tuple[str, str, int]], labels: list[str]) -> dict[str, Any]:
    """Accuracy, per-class P/R/F1/support, macro and weighted averages, confusion matrix.

    `pairs` are (gold, predicted, count); a predicted value outside `labels` (a failed
    row) counts against its gold class and appears as the `<none>` column.
    """
    pairs = [(g, p, n) for g, p, n in pairs if g is not None and n > 0]
    if not pairs:
        return {}
    gold = np.array([g for g, _, _ in pairs], dtype=object)
    pred = np.array([p if p in labels else NO_LABEL for _, p, _ in pairs], dtype=object)
    weight = np.array([n for _, _, n in pairs], dtype=np.int64)
    order = list(labels) + sorted({str(g) for g in gold} - set(labels))
    matrix_order = order + ([NO_LABEL] if NO_LABEL in set(pred) else [])
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=order, sample_weight=weight, zero_division=0)
    macro = precision_recall_fscore_support(gold, pred, labels=order, sample_weight=weight, average="macro", zero_division=0)
    weighted = precision_recall_fscore_support(gold, pred, labels=order, sample_weight=weight, average="weighted", zero_division=0)
    cm = confusion_matrix(gold, pred, labels=matrix_order, sample_weight=weight)
    return {
        "accuracy": float(accuracy_score(gold, pred, sample_weight=weight)),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "weighted_precision": float(weighted[0]),
        "weighted_recall": float(weighted[1]),
        "weighted_f1": float(weighted[2]),
        "per_class": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, label in enumerate(order)
        },
        "confusion_matrix": {"labels": matrix_order, "matrix": cm.astype(np.int64).tolist()},
    }


def reduce_output(ds, labels: list[str], gold_column: str | None) -> dict[str, Any]:
    """Reduce an output Dataset to counts on the cluster, then to the figures on the driver.

    Every block is grouped by (gold, predicted, error, multi-label) with token sums in a
    Ray task where it lies; the driver sums those partial tables (a few hundred rows each
    at most, whatever the block size) and hands the pairs to scikit-learn. A combiner, not
    a shuffle: Ray Data's hash groupby starts aggregator actors, which cost more than the
    whole reduction on a small cluster (77 s for 3,000 rows on 2 busy cores).
    """
    keys = [k for k in (gold_column, schema.LABEL, schema.ERROR, schema.MULTI_LABEL, schema.CACHED) if k]
    partial = ds.map_batches(_count_block, fn_kwargs={"keys": keys}, batch_format="pyarrow", batch_size=None)
    blocks = list(partial.iter_batches(batch_format="pyarrow", batch_size=None))
    table = _count_block(pa.concat_tables(blocks), keys, counted=True) if blocks else _count_block(None, keys)
    table = table.to_pandas()
    counts = table[_COUNT].astype(int)
    failed: dict[str, int] = {}
    for error, n in zip(table[schema.ERROR], counts):
        if not _missing(error):
            failed[str(error)] = failed.get(str(error), 0) + int(n)
    summary: dict[str, Any] = {
        "rows_written": int(counts.sum()),
        "rows_labeled": int(counts.sum()) - sum(failed.values()),
        "rows_failed": sum(failed.values()),
        "failed_by_reason": failed,
        "multi_label_outputs": int(counts[table[schema.MULTI_LABEL].fillna(False).astype(bool)].sum()),
        "rows_cached": int(counts[table[schema.CACHED].fillna(False).astype(bool)].sum()),
        "input_tokens": int(table[schema.INPUT_TOKENS].fillna(0).sum()),
        "output_tokens": int(table[schema.OUTPUT_TOKENS].fillna(0).sum()),
    }
    if gold_column:
        pairs = [
            (None if _missing(g) else str(g), NO_LABEL if _missing(p) else str(p), int(n))
            for g, p, n in zip(table[gold_column], table[schema.LABEL], counts)
        ]
        pairs, summary["gold"] = split_gold(pairs, labels)
        summary.update(scores_from_counts(pairs, labels))
        summary.update(reduce_calibration(ds, labels, gold_column))  # ECE, Brier, accuracy at coverage
    return summary


GOLD_EXAMPLES = 5
"""How many distinct out-of-set gold values `metrics.json` and the summary name."""
GOLD_TREATMENT = "rows whose gold value is missing (null or empty) or outside the label set are left out of accuracy, per-class figures and the confusion matrix"


def split_gold(pairs: list[tuple[str | None, str, int]], labels: list[str]) -> tuple[list[tuple[str, str, int]], dict[str, Any]]:
    """The (gold, predicted, count) pairs that can be scored, and a report of those that cannot.

    A gold value outside the label set can never be predicted (labels are constrained), so
    scoring it would only lower every figure, and silently make it a class of its own; a
    missing gold value says nothing. Both are counted, named and left out (`GOLD_TREATMENT`).
    """
    scored, missing, outside = [], 0, {}
    for g, p, n in pairs:
        if g is None or g == "":
            missing += n
        elif g not in labels:
            outside[g] = outside.get(g, 0) + n
        else:
            scored.append((g, p, n))
    examples = dict(sorted(outside.items(), key=lambda kv: (-kv[1], kv[0]))[:GOLD_EXAMPLES])
    return scored, {
        "scored_rows": sum(n for _, _, n in scored),
        "missing": missing,
        "outside_labels": sum(outside.values()),
        "outside_examples": {shorten(k, 40): v for k, v in examples.items()},
        "treatment": GOLD_TREATMENT,
    }


_COUNT = "rows"
_TOKENS = (schema.INPUT_TOKENS, schema.OUTPUT_TOKENS)


def metrics_columns() -> list[str]:
    """The output columns the reduction reads, besides the gold column."""
    return [schema.LABEL, schema.ERROR, schema.MULTI_LABEL, schema.CACHED, *_TOKENS, schema.LABEL_PROBS]


def _count_block(block: pa.Table | None, keys: list[str], counted: bool = False) -> pa.Table:
    """Rows and token sums per distinct key tuple of `block`; `counted` sums earlier counts."""
    if block is None:
        fields = [pa.field(k, pa.string()) for k in keys] + [pa.field(_COUNT, pa.int64())]
        return pa.schema(fields + [pa.field(t, pa.int64()) for t in _TOKENS]).empty_table()
    count = (_COUNT, "sum") if counted else ([], "count_all")
    grouped = block.group_by(keys, use_threads=False).aggregate([count, *((t, "sum") for t in _TOKENS)])
    names = {f"{_COUNT}_sum": _COUNT, "count_all": _COUNT, **{f"{t}_sum": t for t in _TOKENS}}
    return grouped.rename_columns([names.get(n, n) for n in grouped.column_names])


def _missing(value: Any) -> bool:
    return value is None or bool(pd.isna(value))


def write_metrics(metrics: dict[str, Any], url: str) -> None:
    import fsspec

    with fsspec.open(url, "w") as f:
        json.dump(metrics, f, indent=2, ensure_ascii=False)


def format_table(metrics: dict[str, Any]) -> str:
    """A short human summary: counts, throughput, and per-class figures when there is gold."""
    lines = [
        (f"rows read {metrics['rows_read']}, " if metrics.get("rows_read") is not None else "rows ")
        + f"written {metrics['rows_written']}, labelled {metrics['rows_labeled']}, failed {metrics['rows_failed']}"
        + (f" {metrics['failed_by_reason']}" if metrics["failed_by_reason"] else ""),
        f"tokens in {metrics['input_tokens']}, out {metrics['output_tokens']}"
        + (f" ({metrics['rows_cached']} rows from the response cache)" if metrics.get("rows_cached") else "")
        + "; "
        f"{metrics.get('elapsed_s', 0):.1f} s, {metrics.get('rows_per_s', 0):.2f} rows/s",
    ]
    prior_pass = (metrics.get("calibration") or {}).get("pass")
    if prior_pass and prior_pass["rows"] > prior_pass["rows_cached"]:  # the model was asked: say what it cost
        lines.append(f"calibration pass: {prior_pass['rows'] - prior_pass['rows_cached']} rows asked, tokens in "
                     f"{prior_pass['input_tokens']}, out {prior_pass['output_tokens']}"
                     + (" (the main pass took their answers from the response cache)" if metrics.get("rows_cached") else ""))
    if metrics.get("cost_usd") is not None:
        sync = metrics.get("cost_usd_sync")  # batch mode: the synchronous price of the same tokens beside it
        lines.append(f"cost ${metrics['cost_usd']:.4f}" + (f" at the batch price (synchronous: ${sync:.4f})" if sync is not None else ""))
    gold = metrics.get("gold") or {}
    if gold.get("missing"):
        lines.append(f"gold missing on {gold['missing']} row(s): not scored")
    if gold.get("outside_labels"):
        shown = ", ".join(f"{k!r} ({v})" for k, v in gold["outside_examples"].items())
        lines.append(f"gold outside the label set on {gold['outside_labels']} row(s), e.g. {shown}: not scored")
    if "accuracy" in metrics:
        lines.append(f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}  weighted F1 {metrics['weighted_f1']:.4f}")
        width = max(len(k) for k in metrics["per_class"]) + 2
        lines.append(f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
        for label, m in metrics["per_class"].items():
            lines.append(f"{label:<{width}}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{m['support']:>10d}")
    lines.extend(format_calibration(metrics))
    return "\n".join(lines)
