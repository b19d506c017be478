"""ONNX export of a fine-tuned head, quantized to int8 (dynamic), for ONNX Runtime serving.

`export_onnx(model_dir, check_texts)` writes `model.int8.onnx` next to the Hugging Face
weights: the torch model traced with dynamic batch and sequence axes (fp32), then
`onnxruntime.quantization.quantize_dynamic` (int8 weights, per channel; activations
quantized per input at run time). int8 does not suit every encoder: on a fine-tuned
multilingual-e5-small it changed 2-6% of the labels (BENCHMARKS.md), where MiniLM keeps
them. So with `check_texts` (training passes its validation rows) the int8 labels are
compared with the fp32 export's, and below `MIN_AGREEMENT` the fp32 export is kept
instead, as `model.onnx`. The classifier backend serves whichever is there when
onnxruntime is installed (`raycls.backends.head_engines`), the torch weights staying as
the fallback. Called after training when `model.onnx` is on, or on any trained head
directory: `python -m raycls.train.onnx_export <model dir>` (int8, unchecked).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

ONNX_FILE = "model.int8.onnx"
FP32_FILE = "model.onnx"
ONNX_FILES = (ONNX_FILE, FP32_FILE)
"""What the backend serves, the first that exists."""
OPSET = 17
MIN_AGREEMENT = 0.99
"""The share of check texts whose int8 label must equal the fp32 label for int8 to be kept."""


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def served_onnx(model_dir: str | Path) -> Path | None:
    """The ONNX export a head directory holds, if any."""
    return next((Path(model_dir) / name for name in ONNX_FILES if (Path(model_dir) / name).exists()), None)


def onnx_feed(input_names: list[str], encoded) -> dict:
    """ONNX Runtime's inputs from a tokenizer's output: int64, and zeros for an input the tokenizer
    does not give (`token_type_ids` of an XLM-R tokenizer). The export check and the backend share it."""
    import numpy as np

    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    return {name: np.asarray(encoded[name], dtype=np.int64) if name in encoded else np.zeros_like(ids) for name in input_names}


def export_onnx(model_dir: str | Path, check_texts: list[str] | None = None, max_length: int = 512) -> dict:
    """Trace the head at `model_dir` to ONNX and quantize it to int8; with `check_texts` (cut at
    `max_length` tokens, as the head was trained), keep the fp32 export instead when int8 changes
    too many labels. Returns `{"file", "int8_agreement", "check_rows"}`."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.config.return_dict = False
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = tokenizer(["a sample text to trace", "another"], padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    with tempfile.TemporaryDirectory(prefix="raycls-onnx-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        with torch.inference_mode():
            torch.onnx.export(model, tuple(sample[n] for n in names), str(fp32), input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        for stale in ONNX_FILES:
            (model_dir / stale).unlink(missing_ok=True)
        target = model_dir / ONNX_FILE
        with _without_preprocess_advice():
            quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True)
        agreement = None
        if check_texts:
            agreement = _label_agreement(fp32, target, tokenizer, check_texts, max_length)
            if agreement < MIN_AGREEMENT:
                log.warning("int8 ONNX changed %.1f%% of %d validation labels (more than %.0f%%): keeping the fp32 export, %s",
                            100 * (1 - agreement), len(check_texts), 100 * (1 - MIN_AGREEMENT), FP32_FILE)
                target.unlink()
                target = model_dir / FP32_FILE
                shutil.move(fp32, target)  # the temporary directory may be on another filesystem
    from raycls.train.linear import write_digest

    write_digest(model_dir)
    return {"file": target.name, "int8_agreement": agreement, "check_rows": len(check_texts or [])}


@contextlib.contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """ONNX Runtime's quantizer logs a WARNING on the root logger for every model not run through
    its pre-processing script (a static-quantization aid): nothing a user of a trained head can act on."""
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _label_agreement(fp32: Path, int8: Path, tokenizer, texts: list[str], max_length: int) -> float:
    """The share of `texts` given the same label by both exports (each text alone, as the backend scores)."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
    same = 0
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="np")
        labels = [int(s.run(None, onnx_feed([i.name for i in s.get_inputs()], enc))[0].argmax()) for s in sessions]
        same += labels[0] == labels[1]
    return same / len(texts)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if len(sys.argv) != 2:
        sys.exit("usage: python -m raycls.train.onnx_export <trained model directory>")
    print(export_onnx(sys.argv[1])["file"])
