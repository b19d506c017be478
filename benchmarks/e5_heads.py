"""Embedding heads (`model.method: linear`) on every data set: accuracy, macro-F1 and the C sweep.

    python benchmarks/e5_heads.py embed [--encoder e5-small|minilm] [--sets agnews,thucnews,chnsenticorp]
    python benchmarks/e5_heads.py sweep [--encoder e5-small]

`embed` embeds each data set's training and dev files once with the frozen encoder
(`raycls.train.embed`, the function training and serving use) on this process's CPUs and
caches the vectors under `$RAYCLS_BENCH_EMB` (default `/tmp/raycls-bench-emb`), in chunks,
so that an interrupted run goes on where it stopped. `sweep` fits the logistic regression
(`raycls.train.linear.fit_head`, what training runs) for each C on the cached training
vectors and scores every C on the dev file: nothing is ever scored on rows trained on
(ChnSentiCorp trains on `chnsenticorp_htl_train`, disjoint from its dev file). The
validation pick of C (on a hash-held-out 10% of the training rows, as `jobs/train.py`
picks it) is reported beside the dev score of every C.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"
CACHE = Path(os.environ.get("RAYCLS_BENCH_EMB", "/tmp/raycls-bench-emb"))
SETS = {  # name: (train file, dev file)
    "chnsenticorp": ("chnsenticorp_htl_train", "chnsenticorp_htl_dev"),
    "thucnews": ("thucnews_titles_train", "thucnews_titles_dev"),
    "agnews": ("agnews_train", "agnews_dev"),
}
CHUNK = 256


def rows(stem: str, limit: int | None = None) -> tuple[list[str], list[str], list[str]]:
    import pyarrow.parquet as pq

    t = pq.read_table(DATA / f"{stem}.parquet", columns=["id", "text", "label"])
    t = t.slice(0, limit) if limit else t
    return t.column("id").to_pylist(), t.column("text").to_pylist(), t.column("label").to_pylist()


def embedded(stem: str, encoder: str, encode=None, limit: int | None = None) -> np.ndarray:
    """The file's vectors (its first `limit` rows), computed chunk by chunk (cached) with `encode` when missing."""
    from raycls.train.embed import embed_texts

    _, texts, _ = rows(stem, limit)
    folder = CACHE / encoder / stem
    folder.mkdir(parents=True, exist_ok=True)
    parts, began = [], time.monotonic()
    for k, start in enumerate(range(0, len(texts), CHUNK)):
        part = folder / f"{k:05d}.npy"
        if not part.exists():
            if encode is None:
                raise FileNotFoundError(f"{part}: run `embed` first")
            tmp = folder / f"{k:05d}.tmp.npy"
            np.save(tmp, embed_texts(encode, texts[start:start + CHUNK]))
            tmp.rename(part)
            done = min(start + CHUNK, len(texts))
            print(f"{stem}: {done}/{len(texts)} embedded, {CHUNK / (time.monotonic() - began):.1f} rows/s", flush=True)
            began = time.monotonic()
        parts.append(np.load(part))
    return np.concatenate(parts)


def embed(encoder: str, sets: list[str], threads: int, limit: int | None, dev_limit: int | None) -> None:
    from raycls.train.embed import load_encoder
    from raycls.train.heads import resolve_base_model

    path = None if encoder == "e5-small" else resolve_base_model(encoder)
    encode = load_encoder(encoder, path, threads, 256)
    for name in sets:
        for stem, cap in zip(SETS[name], (limit, dev_limit)):
            began = time.monotonic()
            n = len(embedded(stem, encoder, encode, cap))
            print(json.dumps({"embedded": stem, "encoder": encoder, "rows": n, "s": round(time.monotonic() - began, 1)}), flush=True)


def sweep(encoder: str, sets: list[str], limit: int | None, dev_limit: int | None) -> None:
    from raycls.quality.metrics import scores_from_counts  # noqa: F401  (same metrics as jobs)
    from raycls.train.data import held_out
    from raycls.train.linear import C_GRID, fit_head, predict_ids
    from sklearn.metrics import accuracy_score, f1_score

    for name in sets:
        train_stem, dev_stem = SETS[name]
        try:
            x_train, x_dev = embedded(train_stem, encoder, limit=limit), embedded(dev_stem, encoder, limit=dev_limit)
        except FileNotFoundError as exc:
            print(json.dumps({"set": name, "skipped": str(exc)}))
            continue
        ids, _, y_train_names = rows(train_stem, limit)
        _, _, y_dev_names = rows(dev_stem, dev_limit)
        labels = sorted(set(y_train_names))
        y_train = np.array([labels.index(v) for v in y_train_names])
        y_dev = np.array([labels.index(v) for v in y_dev_names])
        val = np.array([held_out(i, 0, 0.1) for i in ids])
        out = {"set": name, "encoder": encoder, "train_rows": int(len(y_train)), "dev_rows": int(len(y_dev)), "by_C": []}
        for c in C_GRID:
            began = time.monotonic()
            head_val = fit_head(x_train[~val], y_train[~val], c, len(labels))
            val_acc = accuracy_score(y_train[val], predict_ids(head_val, x_train[val]))
            head = fit_head(x_train, y_train, c, len(labels))
            pred = predict_ids(head, x_dev)
            out["by_C"].append({"C": c, "val_accuracy": round(val_acc, 4), "dev_accuracy": round(accuracy_score(y_dev, pred), 4),
                                "dev_macro_f1": round(f1_score(y_dev, pred, average="macro"), 4),
                                "fit_s": round(time.monotonic() - began, 1)})
        best = max(out["by_C"], key=lambda r: r["val_accuracy"])
        out["picked_on_validation"] = best
        print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["embed", "sweep"])
    parser.add_argument("--encoder", default="e5-small")
    parser.add_argument("--sets", default="chnsenticorp,thucnews,agnews")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-rows", type=int, help="the first N training rows (a multiple of 256 reuses the cache)")
    parser.add_argument("--dev-rows", type=int, help="the first N dev rows")
    args = parser.parse_args()
    sets = args.sets.split(",")
    if args.what == "embed":
        embed(args.encoder, sets, args.threads, args.train_rows, args.dev_rows)
    else:
        sweep(args.encoder, sets, args.train_rows, args.dev_rows)


if __name__ == "__main__":
    main()
