"""The metrics reduction equals scikit-learn on the full arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from raycls import schema
from raycls.quality.metrics import NO_LABEL, reduce_output, scores_from_counts

LABELS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def synthetic(n=12_000, seed=7):
    """Predictions right ~60% of the time, 5% failures (no label), skewed classes."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(LABELS, size=n, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    pred = np.where(rng.random(n) < 0.6, gold, rng.choice(LABELS, size=n)).astype(object)
    failed = rng.random(n) < 0.05
    pred[failed] = None
    return gold, pred


def sklearn_figures(gold, pred):
    pred = np.array([p if p is not None else NO_LABEL for p in pred], dtype=object)
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=LABELS, zero_division=0)
    macro = precision_recall_fscore_support(gold, pred, labels=LABELS, average="macro", zero_division=0)
    weighted = precision_recall_fscore_support(gold, pred, labels=LABELS, average="weighted", zero_division=0)
    cm = confusion_matrix(gold, pred, labels=LABELS + [NO_LABEL])
    return accuracy_score(gold, pred), p, r, f, s, macro, weighted, cm


def assert_equal_to_sklearn(metrics, gold, pred):
    acc, p, r, f, s, macro, weighted, cm = sklearn_figures(gold, pred)
    assert metrics["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert metrics["macro_f1"] == pytest.approx(macro[2], abs=1e-12)
    assert metrics["weighted_f1"] == pytest.approx(weighted[2], abs=1e-12)
    assert metrics["macro_precision"] == pytest.approx(macro[0], abs=1e-12)
    assert metrics["weighted_recall"] == pytest.approx(weighted[1], abs=1e-12)
    for i, label in enumerate(LABELS):
        got = metrics["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p[i], r[i], f[i], s[i]), abs=1e-12)
    assert metrics["confusion_matrix"]["labels"] == LABELS + [NO_LABEL]
    assert np.array_equal(np.array(metrics["confusion_matrix"]["matrix"])[: len(LABELS)], cm[: len(LABELS)])


def test_scores_from_counts_equal_sklearn_on_the_full_arrays():
    gold, pred = synthetic()
    counts = pd.DataFrame({"g": gold, "p": [x or NO_LABEL for x in pred]}).value_counts().reset_index()
    pairs = list(zip(counts["g"], counts["p"], counts["count"]))
    assert len(pairs) < 40  # the reduction really is tiny
    assert_equal_to_sklearn(scores_from_counts(pairs, LABELS), gold, pred)


@pytest.mark.ray
def test_cluster_reduction_equals_sklearn(ray_local):
    gold, pred = synthetic(n=10_000, seed=11)
    n = len(gold)
    rows = pd.DataFrame({
        "input_label": gold,
        schema.LABEL: pred,
        schema.ERROR: [None if p is not None else schema.UNPARSEABLE for p in pred],
        schema.MULTI_LABEL: [False] * n,
        schema.CACHED: [i % 4 == 0 for i in range(n)],
        schema.INPUT_TOKENS: np.full(n, 10),
        schema.OUTPUT_TOKENS: np.full(n, 2),
    })
    ds = ray_local.data.from_pandas(rows).repartition(8)
    metrics = reduce_output(ds, LABELS, "input_label")
    assert_equal_to_sklearn(metrics, gold, pred)
    failures = int(sum(p is None for p in pred))
    assert metrics["rows_written"] == n
    assert metrics["rows_failed"] == failures and metrics["failed_by_reason"] == {schema.UNPARSEABLE: failures}
    assert metrics["rows_labeled"] == n - failures
    assert metrics["rows_cached"] == (n + 3) // 4
    assert (metrics["input_tokens"], metrics["output_tokens"]) == (10 * n, 2 * n)
