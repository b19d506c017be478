"""ONNX export of a fine-tuned head, quantized to int8 (dynamic), for ONNX Runtime serving.

`export_onnx(model_dir)` writes `model.int8.onnx` next to the Hugging Face weights: the
torch model traced with dynamic batch and sequence axes (fp32), then
`onnxruntime.quantization.quantize_dynamic` (int8 weights of the MatMul/Gemm layers,
activations quantized per batch at run time). The classifier backend serves it when
onnxruntime is installed (`raycls.backends.head_engines`), the torch weights staying
as the fallback. Called after training when `model.onnx: true`, or on any trained
head directory: `python -m raycls.train.onnx_export <model dir>`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ONNX_FILE = "model.int8.onnx"
OPSET = 17


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model_dir: str | Path) -> Path:
    """Trace the head at `model_dir` to ONNX, quantize it to int8, write `model.int8.onnx`; returns its path."""
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
        target = model_dir / ONNX_FILE
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8)
    from raycls.train.linear import write_digest

    write_digest(model_dir)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if len(sys.argv) != 2:
        sys.exit("usage: python -m raycls.train.onnx_export <trained model directory>")
    print(export_onnx(sys.argv[1]))
