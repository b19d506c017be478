"""A whole training job: checks, data, Ray Train, export; resumable on the same `output.path`."""

from __future__ import annotations

import logging
import time
from typing import Any

from raycls import schema, storage
from raycls.errors import ResumeError
from raycls.train import heads
from raycls.train.data import load_data
from raycls.train.export import METRICS_FILE, MODEL_DIR, export_model, write_train_metrics
from raycls.train.loop import TRAIN_DIR, fit
from raycls.train.spec import E5_SMALL, TrainSpec

log = logging.getLogger(__name__)

SPEC_FILE = "_train_spec.json"
"""The spec a run in `output.path` was started with: a different spec must not resume it."""
ONNX_CHECK_ROWS = 500
"""Validation rows the int8 ONNX export's labels are checked on against fp32 (`onnx_export`)."""


def train(spec: TrainSpec, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume training) a head and export it; returns `train_metrics.json`'s content."""
    from raycls.job.session import init_ray

    started = time.monotonic()
    out = spec.output.path.rstrip("/")
    base_path = heads.resolve_base_model(spec.model.base_model, spec.model.method)
    heads.check_loadable(base_path, spec.model.base_model)
    preflight(spec, overwrite)
    init_ray(worker_output=True)  # the epoch lines come from the training workers
    data = load_data(spec)
    storage.write_json(storage.join(out, SPEC_FILE), spec.model_dump(mode="json"))
    if spec.model.method == "linear":
        return _train_linear(spec, base_path, data, started)
    result = fit(spec, base_path, data)
    if result.checkpoint is None:
        raise ResumeError(f"{out}: training ended without a checkpoint ({result.error})")
    elapsed = time.monotonic() - started
    check_texts = [row[schema.TEXT] for row in data.validation.take(ONNX_CHECK_ROWS)]
    with result.checkpoint.as_directory() as checkpoint_dir:
        onnx = export_model(spec, base_path, checkpoint_dir, storage.join(out, MODEL_DIR), check_texts)
        metrics = write_train_metrics(spec, checkpoint_dir, data.counts, {
            "model_dir": storage.join(out, MODEL_DIR), "elapsed_s": round(elapsed, 3), "onnx": onnx,
            "workers": spec.ray.workers, "cpus_per_worker": spec.ray.cpus_per_worker,
        })
    return metrics


def _train_linear(spec: TrainSpec, base_path: str, data, started: float) -> dict[str, Any]:
    """The embedding head: embed (actor pool), fit (Ray task), export, `train_metrics.json`."""
    from raycls.train.linear import export_linear, fit_linear

    out = spec.output.path.rstrip("/")
    fitted = fit_linear(spec, None if spec.model.base_model == E5_SMALL else base_path, data)
    digest = export_linear(spec, base_path, fitted["head"], storage.join(out, MODEL_DIR))
    best = fitted["best"]
    metrics = {
        "base_model": spec.model.base_model, "method": "linear", "labels": spec.label_names,
        "C": best["C"], "C_tried": fitted["tried"], "val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"],
        "refit_on": "training and validation rows, with the C chosen on validation",
        "embed_s": fitted["embed_s"], "embed_rows_per_s": fitted["embed_rows_per_s"], "fit_s": fitted["fit_s"], "dim": fitted["dim"],
        "char_ngrams": list(spec.model.linear.char_ngrams) if spec.model.linear.char_ngrams else None,
        "ngram_features": len(fitted["head"]["ngram_vocab"]) if "ngram_vocab" in fitted["head"] else 0,
        "weights_sha256": digest, "data": data.counts, "model_dir": storage.join(out, MODEL_DIR),
        "elapsed_s": round(time.monotonic() - started, 3), "workers": spec.ray.workers,
        "cpus_per_worker": spec.ray.cpus_per_worker, "finished_at": storage.utc_now(),
    }
    storage.write_json(storage.join(out, METRICS_FILE), metrics)
    print(f"raycls-train: linear head exported to {metrics['model_dir']} (C={best['C']:g}, validation accuracy "
          f"{best['val_accuracy']:.4f})", flush=True)
    return metrics


def preflight(spec: TrainSpec, overwrite: bool) -> None:
    """Refuse to redo a finished run, or to resume one started with another spec (unless `overwrite`)."""
    out = spec.output.path.rstrip("/")
    if overwrite:
        for name in (MODEL_DIR, TRAIN_DIR, METRICS_FILE, SPEC_FILE):
            storage.remove(storage.join(out, name), recursive=True)
        return
    if storage.exists(storage.join(out, METRICS_FILE)):
        raise ResumeError(f"{out} already holds a trained head ({METRICS_FILE}); pass --overwrite to train again")
    before = storage.read_json(storage.join(out, SPEC_FILE))
    if before is not None and before != spec.model_dump(mode="json"):
        changed = sorted(k for k in set(before) | set(spec.model_dump(mode="json")) if before.get(k) != spec.model_dump(mode="json").get(k))
        raise ResumeError(f"{out} holds an unfinished training run of a different spec (differs in {changed}); "
                          "pass --overwrite to start again, or use another output.path")
