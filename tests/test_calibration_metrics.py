"""ECE, Brier and accuracy at coverage from per-block sums, against scikit-learn and direct sums."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import brier_score_loss

from raycls import schema
from raycls.quality.calibration_metrics import FINE_BINS, _FIELDS, block_sums, figures

LABELS = ["a", "b", "c"]


def _rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([0.6, 0.6, 0.6], size=n)
    pred = probs.argmax(axis=1)
    # Gold agrees with the prediction more often when the model is confident.
    gold = np.where(rng.random(n) < probs.max(axis=1), pred, rng.integers(0, 3, n))
    return probs, pred, gold


def _table(probs, pred, gold) -> pa.Table:
    return pa.table({
        "gold": [LABELS[g] for g in gold],
        schema.LABEL: [LABELS[p] for p in pred],
        schema.LABEL_PROBS: [dict(zip(LABELS, map(float, p))) for p in probs],
    })


def _reduce(table: pa.Table, blocks: int) -> dict:
    """What the cluster does: sums per block, added up on the driver."""
    sums = np.zeros((FINE_BINS, len(_FIELDS)))
    for part in np.array_split(np.arange(table.num_rows), blocks):
        partial = block_sums(table.take(pa.array(part)), "gold", LABELS)
        for i, f in enumerate(_FIELDS):
            np.add.at(sums[:, i], partial.column("bin").to_numpy(), partial.column(f).to_numpy())
    return figures(sums)


def test_brier_matches_scikit_learn_multiclass():
    probs, pred, gold = _rows(300)
    got = _reduce(_table(probs, pred, gold), blocks=4)
    expected = brier_score_loss([LABELS[g] for g in gold], probs, labels=LABELS, scale_by_half=False)
    assert got["brier"] == pytest.approx(expected)


def test_brier_for_two_labels_is_twice_scikit_learns_binary_score():
    rng = np.random.default_rng(1)
    p = rng.random(200)
    gold = (rng.random(200) < p).astype(int)
    probs = np.stack([1 - p, p], axis=1)
    table = pa.table({"gold": [LABELS[g] for g in gold], schema.LABEL: [LABELS[int(q > 0.5)] for q in p],
                      schema.LABEL_PROBS: [{"a": float(1 - q), "b": float(q)} for q in p]})
    sums = block_sums(table, "gold", ["a", "b"])
    full = np.zeros((FINE_BINS, len(_FIELDS)))
    for i, f in enumerate(_FIELDS):
        np.add.at(full[:, i], sums.column("bin").to_numpy(), sums.column(f).to_numpy())
    assert figures(full)["brier"] == pytest.approx(2 * brier_score_loss(gold, p))
    assert probs.shape == (200, 2)


def test_ece_over_ten_equal_bins_matches_the_direct_sum():
    probs, pred, gold = _rows(500, seed=2)
    got = _reduce(_table(probs, pred, gold), blocks=7)
    conf = probs.max(axis=1)
    correct = pred == gold
    bins = np.minimum((conf * 10).astype(int), 9)
    direct = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).sum() / len(conf)
                 for b in range(10) if (bins == b).any())
    assert got["ece"] == pytest.approx(direct)
    assert got["ece_bins"] == 10 and sum(b["rows"] for b in got["reliability"]) == 500


def test_accuracy_at_coverage_is_the_accuracy_of_the_most_confident_rows():
    probs, pred, gold = _rows(1000, seed=3)
    got = {c["target"]: c for c in _reduce(_table(probs, pred, gold), blocks=3)["coverage"]}
    conf = probs.max(axis=1)
    correct = pred == gold
    for target in (0.5, 0.8, 0.9, 1.0):
        c = got[target]
        chosen = conf >= c["threshold"]
        # Whole fine bins: the coverage reached is at least the target, and its accuracy is
        # exactly that of the rows at or above the threshold it reports.
        assert c["coverage"] >= target - 1e-9 and c["coverage"] == pytest.approx(chosen.mean())
        assert c["accuracy"] == pytest.approx(correct[chosen].mean())
    assert got[1.0]["accuracy"] == pytest.approx(correct.mean())
    assert got[0.5]["accuracy"] > got[1.0]["accuracy"]  # confident rows are right more often here
