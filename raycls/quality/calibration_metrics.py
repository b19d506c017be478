"""Which labels can be trusted: calibration error, Brier score, accuracy at coverage.

Reduced like the other metrics: every block becomes a small table of partial sums on a
Ray task where it lies (per fine confidence bin: rows, correct rows, summed confidence,
summed Brier terms), the driver adds the tables up. `FINE_BINS` equal-width bins of
confidence are exact for ECE over `ECE_BINS` bins (each ECE bin is a whole number of
fine bins, and the sums inside a bin add up exactly) and give the coverage figures to
1/FINE_BINS of confidence (a coverage step takes whole fine bins, so the coverage
reached can exceed the target by the rows of one bin; the figure reached is reported).

Rows counted: those with a gold label, a predicted label and `label_probs` (rows that
failed, or with no probabilities from the engine, are left out; `calibration_rows` says
how many were counted).

- `ece`: expected calibration error over `ECE_BINS` equal-width bins of confidence
  ([0, 0.1), ..., [0.9, 1.0]): sum over bins of rows_b / N * |accuracy_b - mean confidence_b|.
- `brier`: multi-class Brier score, the mean over rows of sum over labels of
  (p_label - [label is gold])², in [0, 2]: what scikit-learn's `brier_score_loss` gives with
  `scale_by_half=False` (for two labels it halves it by default).
- `coverage`: for the most confident 50/80/90/100% of rows, their accuracy and the
  confidence threshold that selects them (rows at or above it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raycls import schema

FINE_BINS = 1000
ECE_BINS = 10
COVERAGES = (0.5, 0.8, 0.9, 1.0)
_FIELDS = ("rows", "correct", "confidence_sum", "brier_sum")


def block_sums(block: pa.Table, gold_column: str, labels: list[str]) -> pa.Table:
    """Partial sums of one block per fine confidence bin (only bins with rows)."""
    if schema.LABEL_PROBS not in block.column_names:  # an output written before label_probs existed
        return pa.table({"bin": pa.array([], pa.int64()), **{f: pa.array([], pa.float64()) for f in _FIELDS}})
    gold = block.column(gold_column).to_pylist()
    pred = block.column(schema.LABEL).to_pylist()
    probs = block.column(schema.LABEL_PROBS).to_pylist()
    sums = np.zeros((FINE_BINS, len(_FIELDS)))
    for g, p, pr in zip(gold, pred, probs):
        if g is None or p is None or not pr or not any(pr.values()):
            continue
        confidence = float(pr.get(p) or 0.0)
        b = min(int(confidence * FINE_BINS), FINE_BINS - 1)
        brier = sum((float(pr.get(k) or 0.0) - (1.0 if k == str(g) else 0.0)) ** 2 for k in labels)
        brier += 0.0 if str(g) in labels else 1.0  # a gold label outside the set has probability 0
        sums[b] += (1, float(str(g) == p), confidence, brier)
    used = np.nonzero(sums[:, 0])[0]
    return pa.table({"bin": pa.array(used, pa.int64()), **{f: pa.array(sums[used, i]) for i, f in enumerate(_FIELDS)}})


def reduce_calibration(ds, labels: list[str], gold_column: str) -> dict[str, Any]:
    """The figures of the module docstring for an output Dataset (empty without usable rows)."""
    partial = ds.map_batches(block_sums, fn_kwargs={"gold_column": gold_column, "labels": labels},
                             batch_format="pyarrow", batch_size=None)
    sums = np.zeros((FINE_BINS, len(_FIELDS)))
    for batch in partial.iter_batches(batch_format="pyarrow", batch_size=None):
        for i, f in enumerate(_FIELDS):
            np.add.at(sums[:, i], batch.column("bin").to_numpy(), batch.column(f).to_numpy())
    return figures(sums)


def figures(sums: np.ndarray) -> dict[str, Any]:
    """ECE, Brier, reliability bins and coverage from the summed fine-bin table."""
    n = sums[:, 0].sum()
    if n == 0:
        return {}
    per = FINE_BINS // ECE_BINS
    coarse = sums.reshape(ECE_BINS, per, len(_FIELDS)).sum(axis=1)
    reliability, ece = [], 0.0
    for b, (rows, correct, conf, _) in enumerate(coarse):
        if rows:
            ece += rows / n * abs(correct / rows - conf / rows)
        reliability.append({
            "low": b / ECE_BINS, "high": (b + 1) / ECE_BINS, "rows": int(rows),
            "accuracy": float(correct / rows) if rows else None, "confidence": float(conf / rows) if rows else None,
        })
    return {
        "calibration_rows": int(n),
        "ece": float(ece),
        "ece_bins": ECE_BINS,
        "brier": float(sums[:, 3].sum() / n),
        "reliability": reliability,
        "coverage": coverage_table(sums),
    }


def coverage_table(sums: np.ndarray, targets: tuple[float, ...] = COVERAGES) -> list[dict[str, float]]:
    """Accuracy of the most confident rows for each target coverage, with its threshold."""
    n = sums[:, 0].sum()
    order = np.arange(FINE_BINS)[::-1]  # most confident first
    rows = np.cumsum(sums[order, 0])
    correct = np.cumsum(sums[order, 1])
    out = []
    for target in targets:
        i = int(np.searchsorted(rows, target * n - 1e-9))
        i = min(i, FINE_BINS - 1)
        out.append({
            "target": target, "coverage": float(rows[i] / n), "accuracy": float(correct[i] / rows[i]),
            "threshold": float(order[i] / FINE_BINS),
        })
    return out


def format_calibration(metrics: dict[str, Any]) -> list[str]:
    """Summary-table lines for these figures (none when they were not computed)."""
    if "ece" not in metrics:
        return []
    lines = [f"ECE ({metrics['ece_bins']} bins) {metrics['ece']:.4f}  Brier {metrics['brier']:.4f}  "
             f"(over {metrics['calibration_rows']} rows with label probabilities)"]
    lines.append("accuracy at coverage: " + "  ".join(
        f"{c['coverage']:.0%} -> {c['accuracy']:.3f} (conf >= {c['threshold']:.3f})" for c in metrics["coverage"]))
    return lines
