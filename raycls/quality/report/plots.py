"""The report's figures, one function each, returned as PNG bytes (matplotlib, headless Agg)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buffer.getvalue()


def confusion(name: str, metrics: dict[str, Any]) -> bytes | None:
    """Heatmap of one variant's confusion matrix: gold in rows, predicted in columns, row-normalised colour."""
    cm = metrics.get("confusion_matrix")
    if not cm:
        return None
    plt = _plt()
    labels, matrix = cm["labels"], np.array(cm["matrix"], dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.2 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{name}: accuracy {metrics.get('accuracy', 0):.3f}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the gold row")
    return _png(fig)


def per_class_f1(results: list[Any]) -> bytes | None:
    """Grouped bars: F1 of each class, one bar per variant."""
    scored = [r for r in results if r.metrics.get("per_class")]
    if not scored:
        return None
    plt = _plt()
    classes = list(scored[0].metrics["per_class"])
    width = 0.8 / len(scored)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(classes) * max(1, len(scored) / 2)), 3.8))
    for k, r in enumerate(scored):
        values = [r.metrics["per_class"].get(c, {}).get("f1", 0.0) for c in classes]
        ax.bar(np.arange(len(classes)) + k * width - 0.4 + width / 2, values, width, label=r.name)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("F1 per class")
    ax.legend(fontsize=8, ncol=min(4, len(scored)))
    return _png(fig)


def reliability(results: list[Any]) -> bytes | None:
    """Accuracy against mean confidence in each confidence bin, per variant; the diagonal is perfect."""
    scored = [r for r in results if r.metrics.get("reliability")]
    if not scored:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for r in scored:
        bins = [b for b in r.metrics["reliability"] if b["rows"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{r.name} (ECE {r.metrics['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence (mean in each of {scored[0].metrics['ece_bins']} bins)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend(fontsize=8)
    return _png(fig)


def coverage_curves(results: list[Any]) -> bytes | None:
    """Accuracy of the most confident rows against the share of rows kept, per variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    drawn = False
    for r in results:
        rows = r.rows
        known = rows[rows["confidence"].notna() & rows["_gold"].notna()] if "_gold" in rows else rows.iloc[0:0]
        if known.empty:
            continue
        ordered = known.sort_values("confidence", ascending=False, kind="stable")
        correct = (ordered["label"] == ordered["_gold"]).to_numpy(dtype=float)
        kept = np.arange(1, len(correct) + 1)
        ax.plot(kept / len(correct), np.cumsum(correct) / kept, label=r.name)
        drawn = True
    if not drawn:
        _plt().close(fig)
        return None
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of rows, most confident first)")
    ax.set_ylabel("accuracy of the rows kept")
    ax.set_title("Accuracy vs coverage")
    ax.legend(fontsize=8)
    return _png(fig)


def answers(results: list[Any]) -> bytes:
    """Multi-label answers (seen before the constraint) and rows with no valid label, per variant."""
    plt = _plt()
    names = [r.name for r in results]
    multi = [r.metrics.get("multi_label_outputs", 0) for r in results]
    failed = [r.metrics.get("rows_failed", 0) for r in results]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 3.4))
    ax.bar(x - 0.2, multi, 0.4, label="multi-label answers")
    ax.bar(x + 0.2, failed, 0.4, label="rows without a valid label")
    for xs, values in ((x - 0.2, multi), (x + 0.2, failed)):
        for xi, v in zip(xs, values):
            ax.text(xi, v, str(v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, max([*multi, *failed, 1]) * 1.15)  # counts: never below 0, room for the labels
    ax.set_ylabel("rows")
    ax.set_title("Multi-label and invalid answers")
    ax.legend(fontsize=8)
    return _png(fig)
