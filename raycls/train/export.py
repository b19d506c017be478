"""The end of a training run: a Hugging Face model directory and `train_metrics.json`.

The directory is the base model with its trained head (LoRA adapters merged into the
weights), saved with `save_pretrained` together with its tokenizer: `transformers`
loads it as it is (`AutoModelForSequenceClassification`), and so does the `classifier`
backend. Its `config.json` carries `id2label`, which the backend checks against a job's
labels before reading any row.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from raycls import storage
from raycls.train import heads
from raycls.train.loop import load_checkpoint_weights, read_checkpoint_state
from raycls.train.spec import E5_SMALL, MINILM, TrainSpec

log = logging.getLogger(__name__)

MODEL_DIR = "model"
METRICS_FILE = "train_metrics.json"


def export_model(spec: TrainSpec, base_path: str, checkpoint_dir: str, out_url: str, check_texts: list[str]) -> dict | None:
    """Build the base model, load the trained weights, merge LoRA, save model and tokenizer to `out_url`.
    Returns what the ONNX export kept (`onnx_export.export_onnx`), or None without one; `check_texts`
    (validation rows) decide between its int8 and fp32 forms."""
    net, tokenizer = heads.build_model(base_path, spec.model, spec.label_names, seed=spec.training.seed)
    heads.load_trainable(net, load_checkpoint_weights(checkpoint_dir))
    plain = heads.merged(net)
    onnx = spec.model.onnx if spec.model.onnx is not None else spec.model.base_model in (MINILM, E5_SMALL)
    fs, path = storage.fs_path(out_url)
    if storage.is_local(fs):
        return _save(plain, tokenizer, Path(path), onnx, check_texts, spec.model.max_length)
    with tempfile.TemporaryDirectory(prefix="raycls-head-") as tmp:
        kept = _save(plain, tokenizer, Path(tmp), onnx, check_texts, spec.model.max_length)
        fs.put(tmp.rstrip("/") + "/", path, recursive=True)
    return kept


def _save(net: Any, tokenizer: Any, target: Path, onnx: bool, check_texts: list[str], max_length: int) -> dict | None:
    from raycls.train.linear import write_digest
    from raycls.train.onnx_export import export_onnx, onnx_available

    target.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(target)
    tokenizer.save_pretrained(target)
    write_digest(target)  # head_digest.json: what a labelling job's fingerprint hashes
    if not onnx:
        return None
    if not onnx_available():
        log.info("onnx/onnxruntime not installed: the head is served with torch (pip install 'raycls[train]')")
        return None
    try:
        return export_onnx(target, check_texts, max_length)  # rewrites head_digest.json with the ONNX file included
    except Exception as exc:  # the torch weights are complete without it: serve them, say why
        log.warning("ONNX export of %s failed (%s: %s); the head is served with torch", target, type(exc).__name__, exc)
        return None


def write_train_metrics(spec: TrainSpec, checkpoint_dir: str, counts: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`train_metrics.json`: the per-epoch curve, the data counts and what was trained how."""
    state = read_checkpoint_state(checkpoint_dir)
    final = state["curve"][-1] if state["curve"] else {}
    metrics = {
        "base_model": spec.model.base_model,
        "method": spec.model.method,
        "labels": spec.label_names,
        "epochs": state["epoch"],
        "curve": state["curve"],
        "val_accuracy": final.get("val_accuracy"),
        "val_macro_f1": final.get("val_macro_f1"),
        "data": counts,
        **extra,
        "finished_at": storage.utc_now(),
    }
    storage.write_json(storage.join(spec.output.path, METRICS_FILE), metrics)
    return metrics
