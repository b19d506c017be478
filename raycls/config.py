"""The job spec: typed, validated models, YAML loading and `--set a.b=c` overrides.

A spec is one YAML file. Unknown keys are errors, and every error names the dotted
key path and what was expected, before any data is read or any model loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Annotated, Any, Literal, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raycls.errors import SpecError, excerpt

EMBEDDED_MODEL = "embedded:gemma3-270m"
"""The model that runs when none is named: Gemma 3 270M from PyPI, on the CPU build of vLLM."""


class _Model(BaseModel):
    # Field docstrings become the JSON schema's descriptions (`raycls schema`).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class InputSpec(_Model):
    """Where the rows come from and which columns mean what."""

    path: str | None = None
    """A file, a directory or a glob, local or any fsspec URL (`s3://`, `memory://`, ...); for
    `format: delta`, the Delta table's root. Required unless `format` is `iceberg`."""
    format: Literal["parquet", "jsonl", "csv", "iceberg", "delta"] | None = None
    """File format; inferred from the extension when absent. `iceberg` and `delta` read a lake
    table (`raycls.lake`): `iceberg` names it by `table`, `delta` by `path`."""
    table: str | None = None
    """`format: iceberg`: the table identifier in the catalog, e.g. `db.news`."""
    catalog: dict[str, str] | None = None
    """`format: iceberg`: PyIceberg catalog properties (`name`, `type`, `uri`, `warehouse`,
    `s3.endpoint`, ...). Default: PyIceberg's own configuration (`~/.pyiceberg.yaml`,
    `PYICEBERG_CATALOG__*` variables). A value may be `env:NAME` or `file:PATH`; secrets
    (keys named *secret*, *password*, *token*, *credential*, *access-key*) must be."""
    snapshot: int | None = None
    """`format: iceberg`: the snapshot id to read (`raycls run`) or to label up to (`label-new`).
    Default: the table's current snapshot."""
    version: int | None = Field(default=None, ge=0)
    """`format: delta`: the table version to read or to label up to. Default: the latest."""
    row_filter: str | None = None
    """`format: iceberg`: a PyIceberg filter expression applied in the scan, e.g. `lang = 'en'`."""
    text: str = "text"
    """A column name, or a template over columns such as `"{title}. {description}"`."""
    id_column: str | None = None
    """Column holding a unique row id. When absent, ids derive from file and row number."""
    gold_column: str | None = None
    """Column with the true label; when set, the job ends with accuracy metrics."""
    keep_columns: list[str] | None = None
    """Input columns copied to the output. Default: all of them."""
    duplicate_ids: Literal["error", "keep_first", "suffix"] = "error"
    """What a repeated `id_column` value does, found by a pass over the ids before any model
    call. `error` (default): refuse the job, naming how many and a few. `suffix`: later
    occurrences get `<id>#2`, `<id>#3`, ... in file order and are labelled. `keep_first`: the
    first is labelled; later ones get the suffixed id and `error = duplicate_id`, no model call."""
    encoding: str = "utf-8"
    """Text encoding of JSONL and CSV files (`utf-8`, `latin-1`, `gb18030`, ...). A UTF-8 BOM is accepted."""
    encoding_errors: Literal["error", "replace"] = "error"
    """A line not valid in `encoding`: `error` (default) stops the job naming file and line;
    `replace` decodes it with U+FFFD and flags the row `error = decode_error` (no model call)."""

    @property
    def text_is_template(self) -> bool:
        return "{" in self.text

    @property
    def is_table(self) -> bool:
        """Whether the input is a lake table (Iceberg, Delta) rather than files."""
        return self.format in ("iceberg", "delta")

    @property
    def source(self) -> str:
        """How the input is named in records and messages: its path, or `iceberg:<table>`."""
        return f"iceberg:{self.table}" if self.format == "iceberg" else str(self.path)

    @model_validator(mode="after")
    def _table_or_path(self) -> "InputSpec":
        from raycls.lake import check_input_spec

        check_input_spec(self)
        return self

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, name: str) -> str:
        import codecs

        try:
            codecs.lookup(name)
        except LookupError:
            raise ValueError(f"unknown text encoding {name!r}; e.g. utf-8, latin-1, gb18030") from None
        return name


class Label(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    """Optional; shown to the model in the prompt."""
    answer: str | None = Field(default=None, min_length=1)
    """Optional verbalizer: the word the model is asked to write for this label (e.g.
    `Technology` for `Sci/Tech`, `好评` for `positive`). Prompts, constrained decoding and
    scoring use it; the output always holds `name`. Default: the name itself."""

    @property
    def word(self) -> str:
        """What the model writes for this label: the `answer`, else the name."""
        return self.answer or self.name


def names_as_labels(value: Any) -> Any:
    """`labels: [a, b]` as shorthand for `labels: [{name: a}, {name: b}]`."""
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class FewShotExample(_Model):
    text: str
    label: str
    reasoning: str | None = None
    """Shown before the label for the `reason` and `json` prompts."""


class BackendConfig(_Model):
    """What every backend's config has. Each subclass is one backend (`kind`), registered
    with its implementation by type (`raycls.backends.register`); `raycls.backends.Backend`
    is the runtime side."""

    kind: str
    model: str
    batch_size: int = Field(default=64, ge=1)
    """Rows handed to the backend at a time (a Ray Data batch)."""


class VLLMConfig(BackendConfig):
    """vLLM engines through `ray.data.llm`; on a machine without GPUs, the CPU build."""

    kind: Literal["vllm"] = "vllm"
    model: str = EMBEDDED_MODEL
    """A Hugging Face id or local directory, or `embedded:gemma3-270m`."""
    engines: int = Field(default=1, ge=1)
    """Number of engine actors (data parallelism)."""
    gpus_per_engine: int = Field(default=1, ge=0)
    """GPUs per engine (tensor parallelism). 0 runs the engine on CPUs."""
    device: Literal["auto", "gpu", "cpu"] = "auto"
    """Where engines run. `auto`: on GPUs if the cluster has any when the job starts, else
    the CPU build. `gpu`: always on GPUs, waiting for the autoscaler to start GPU workers
    (a cluster that scales GPU workers from zero). `cpu`: always the CPU build."""
    batch_size: int = Field(default=16, ge=1)
    """Rows per batch sent to an engine actor."""
    max_model_len: int = Field(default=1024, ge=64)
    """Context window in tokens; longer texts are truncated to fit and flagged."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Output token cap. Default: enough for the prompt kind (a label, or reasoning + label)."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    dtype: str = "auto"
    """Engine dtype; `auto` picks float32 on CPU and the model's dtype on GPU."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to the vLLM engine as they are (e.g. `enable_prefix_caching`)."""

    @model_validator(mode="before")
    @classmethod
    def _one_max_model_len(cls, data: Any) -> Any:
        """`engine_kwargs.max_model_len` and `max_model_len` are one setting: the engine's
        context and the truncation budget must not disagree."""
        if not isinstance(data, dict) or not isinstance(data.get("engine_kwargs"), dict):
            return data
        engine_len = data["engine_kwargs"].get("max_model_len")
        if engine_len is None:
            return data
        if "max_model_len" in data and data["max_model_len"] != engine_len:
            raise SpecError(  # raised as it is (not a ValueError) to name the key
                "backend.engine_kwargs.max_model_len",
                f"{engine_len} differs from backend.max_model_len ({data['max_model_len']}); they are one "
                "setting (the engine's context and the truncation budget): set only backend.max_model_len")
        return {**data, "max_model_len": engine_len}

    @field_validator("device")
    @classmethod
    def _gpu_device_needs_gpus(cls, device: str, info) -> str:
        if device == "gpu" and info.data.get("gpus_per_engine") == 0:
            raise ValueError("'gpu' needs gpus_per_engine of at least 1")
        return device


class OpenAIConfig(BackendConfig):
    """Rate-limited callers of an OpenAI-compatible API that rotate several keys."""

    kind: Literal["openai"] = "openai"
    base_url: str
    """The API root, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`."""
    model: str
    """The model name the server knows (sent as `model`)."""
    api_keys: list[str] = Field(min_length=1)
    """Where keys come from, never keys themselves: `env:NAME` (one key, or several
    separated by commas), or `file:PATH` (one key per line). Read where the callers run."""
    rpm: int = Field(default=60, ge=1)
    """Requests per minute allowed per key."""
    tpm: int = Field(default=100_000, ge=1)
    """Tokens (in + out, as the server reports usage) per minute allowed per key."""
    rate_window_s: float = Field(default=60.0, gt=0)
    """The window `rpm`/`tpm` are counted over, in seconds. Providers use 60; tests shorten it."""
    max_concurrency: int = Field(default=32, ge=1)
    """Requests in flight per caller actor."""
    actors: int = Field(default=1, ge=1)
    """Number of caller actors."""
    num_cpus: float = Field(default=0.25, gt=0)
    """CPUs reserved per caller actor (they mostly wait on the network)."""
    batch_size: int = Field(default=64, ge=1)
    """Rows per batch handed to a caller actor."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Seconds before a request is abandoned (and retried)."""
    max_retries: int = Field(default=5, ge=0)
    """Retries of a request after a timeout, connection error or 5xx (exponential backoff with jitter)."""
    max_reasks: int = Field(default=2, ge=0)
    """Re-asks when an answer does not parse as a label."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    """Answer token cap. Default: enough for the prompt kind (a label, or reasoning + label)."""
    context_window: int | None = Field(default=None, ge=64)
    """The model's context in tokens: longer texts are cut to fit (estimated) and flagged
    `truncated`. None: no cut up front (a server's 'too long' answer still cuts and retries)."""
    response_format: Literal["auto", "json_schema", "json_object", "choice", "none"] = "auto"
    """`auto`: a JSON schema (label enum) where the prompt wants JSON, plain text otherwise.
    `choice`: vLLM's `structured_outputs.choice` (vLLM servers only). A server that rejects
    `json_schema` falls back to `json_object`, then to plain text and the tolerant parser."""
    endpoint: Literal["chat", "completions"] = "chat"
    """`chat` (/chat/completions) or `completions` (/completions, for base models)."""
    logprobs: bool = True
    """Ask for `top_logprobs` to compute confidence (not every server gives them)."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Extra request fields passed as they are (server-specific options)."""
    price_in_per_m: float = Field(default=0.0, ge=0)
    """Price in dollars per million input tokens."""
    price_out_per_m: float = Field(default=0.0, ge=0)
    """Price in dollars per million output tokens."""
    max_cost: float | None = Field(default=None, gt=0)
    """Stop spending when the running cost reaches this many dollars: rows not yet
    labelled get `error = budget_exhausted` (rows out still equal rows in)."""
    mode: Literal["sync", "batch"] = "sync"
    """`sync`: one request per row, answered at once. `batch`: the provider's Batch API
    (`/v1/files` + `/v1/batches`): half the price, answers within `batch_completion_window`;
    the job can be left, killed and run again (docs/api.md, "Batch mode")."""
    batch_max_requests: int = Field(default=50_000, ge=1)
    """Batch mode: requests per batch file at most (OpenAI's limit: 50,000)."""
    batch_max_bytes: int = Field(default=200_000_000, ge=1024)
    """Batch mode: bytes per uploaded batch file at most (OpenAI's limit: 200 MB)."""
    max_enqueued_tokens: int | None = Field(default=None, ge=1)
    """Batch mode: estimated tokens (in + answer cap) in flight at most, over all batches of
    the model; more batches are submitted as earlier ones finish. None: no limit of ours
    (the provider's "enqueued token limit" error still makes the job back off)."""
    batch_discount: float = Field(default=0.5, gt=0, le=1)
    """Batch mode: the share of the synchronous price a batch request costs (OpenAI: 0.5)."""
    poll_interval_s: float = Field(default=30.0, gt=0)
    """Batch mode: seconds between polls of in-flight batches."""
    batch_completion_window: str = "24h"
    """Batch mode: the `completion_window` asked of the provider."""

    @field_validator("api_keys")
    @classmethod
    def _keys_are_references(cls, refs: list[str]) -> list[str]:
        for ref in refs:
            if not (ref.startswith("env:") or ref.startswith("file:")) or len(ref) < 5:
                # Never echo the value: it may be a pasted key.
                raise ValueError("each entry must be 'env:VARIABLE' or 'file:PATH', not a literal key")
        return refs

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return url.rstrip("/")


class ClassifierConfig(BackendConfig):
    """A fine-tuned classifier head (`python jobs/train.py`) in a Ray Data actor pool: one
    forward pass per batch, no generation; label probabilities are the head's softmax."""

    kind: Literal["classifier"] = "classifier"
    model: str
    """The trained model directory (`<train output.path>/model`), local or any fsspec URL. Its
    labels (`id2label` in `config.json`) must be the job's labels."""
    batch_size: int = Field(default=64, ge=1)
    """Rows per forward pass."""
    actors: int = Field(default=1, ge=1)
    """Number of predictor actors, each holding the model."""
    num_cpus: float = Field(default=1.0, gt=0)
    """CPUs reserved per actor; its torch thread count is this, rounded down (at least 1)."""
    max_length: int = Field(default=256, ge=8)
    """Tokens per text; longer texts are cut and flagged `truncated`."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """`auto`: one GPU per actor if the cluster has GPUs when the job starts, else CPUs."""


AnyBackendConfig = Annotated[Union[VLLMConfig, OpenAIConfig, ClassifierConfig], Field(discriminator="kind")]
"""The spec's `backend`: one of the backend configs, told apart by `kind`."""


class ReviewSpec(_Model):
    """Rows written again to `<output>/review/` (Parquet and CSV) for a person to check,
    most doubtful first. Give `below` or `share` (or both: rows matching either)."""

    below: float | None = Field(default=None, gt=0.0, le=1.0)
    """Rows whose confidence is below this (0-1], and rows with no confidence or an error."""
    share: float | None = Field(default=None, gt=0.0, le=1.0)
    """The least confident share (0-1] of the labelled rows, e.g. 0.1 for the bottom 10%."""

    @model_validator(mode="after")
    def _one_rule(self) -> "ReviewSpec":
        if self.below is None and self.share is None:
            raise ValueError("give 'below' (a confidence threshold) or 'share' (a share of rows)")
        return self


class CalibrationSpec(_Model):
    """How raw label probabilities are calibrated before the label is picked (`raycls.quality.calibration`)."""

    method: Literal["none", "contextual", "batch"] = "none"
    """`none`: the model's probabilities as they are. `contextual`: divided by the prior the
    job's prompt gives content-free inputs ("", "N/A", "[MASK]"), renormalised. `batch`: divided
    by the mean probabilities over a fixed sample of the input, renormalised."""
    sample_rows: int = Field(default=64, ge=2, le=100_000)
    """`batch`: rows in the prior's sample (the rows with the smallest id hashes: the same rows
    on every run and resume, whatever the input order)."""


class OutputSpec(_Model):
    path: str
    """Directory (local or fsspec URL) for the annotated Parquet and `metrics.json`. With
    `format: iceberg`, where a run stages its labels (and its checkpoint) before the commit."""
    format: Literal["parquet", "iceberg"] = "parquet"
    """`parquet` (default): files under `path`. `iceberg`: the labels are appended to the
    Iceberg table `table`, one commit per run (`raycls.lake`)."""
    table: str | None = None
    """`format: iceberg`: the labels table, e.g. `db.news_labels`; created on first use."""
    catalog: dict[str, str] | None = None
    """`format: iceberg`: catalog properties, as `input.catalog` (default: the input's
    catalog when the input is Iceberg, else PyIceberg's own configuration)."""
    checkpoint_path: str | None = None
    """Where finished ids are checkpointed. Default: `<path>/_checkpoint`."""
    review: ReviewSpec | None = None
    """Also write the least confident rows to `<path>/review/` (see `ReviewSpec`). Default: off."""

    @model_validator(mode="after")
    def _table_named(self) -> "OutputSpec":
        from raycls.lake import check_output_spec

        check_output_spec(self)
        return self


class IncrementalSpec(_Model):
    """How `raycls label-new` treats a lake table's history (`raycls.lake.runs`)."""

    on_rewrite: Literal["skip", "relabel", "error"] = "error"
    """A source snapshot (Delta: version) since the watermark that is not an append (an
    overwrite, a delete, a compaction): `error` (default) stops naming it, labelling nothing;
    `skip` labels only the appended rows and moves past it; `relabel` labels the whole table
    as it is now and replaces the labels with them."""


class CacheSpec(_Model):
    """The response cache (`raycls.backends.cache`): a row whose text was labelled before with the same
    model, prompt and sampling settings gets that label again without a model call."""

    enabled: bool = True
    """False: every row goes to the model, and nothing is stored."""
    path: str | None = None
    """Where cached answers live: a directory, local or any fsspec URL (shared by every run
    that names it). Default: `$RAYCLS_RESPONSE_CACHE` when set (`off` there turns the default
    cache off), else `$RAYCLS_CACHE/responses` (`~/.cache/raycls/responses`)."""
    actors: int = Field(default=1, ge=1, le=64)
    """Cache actors; each holds the entries of 1/actors of the key space in memory."""


class JobSpec(_Model):
    """A whole labelling job."""

    input: InputSpec
    labels: list[Label] = Field(min_length=2)
    prompt: str = "basic"
    """A built-in name (`basic`, `reason`, `json`) or a path to a template file."""
    language: Literal["en", "zh"] = "en"
    """Language of the built-in prompt."""
    instructions: str | None = None
    """Task description placed at the top of the prompt (e.g. 'Classify the news article by topic')."""
    few_shot: list[FewShotExample] = Field(default_factory=list)
    backend: AnyBackendConfig = Field(default_factory=VLLMConfig)
    output: OutputSpec
    limit: int | None = Field(default=None, ge=1)
    """Label only the first N rows (for trials)."""
    cache: CacheSpec = Field(default_factory=CacheSpec)
    """The response cache; see `CacheSpec`."""
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    """Calibration of the label probabilities; a bare method name (`batch`) is accepted."""
    incremental: IncrementalSpec = Field(default_factory=IncrementalSpec)
    """How `label-new` treats snapshots of a lake table that are not appends; see `IncrementalSpec`."""

    @field_validator("calibration", mode="before")
    @classmethod
    def _method_name(cls, value: Any) -> Any:
        return {"method": value} if isinstance(value, str) else value

    @field_validator("labels", mode="before")
    @classmethod
    def _names_as_labels(cls, value: Any) -> Any:
        return names_as_labels(value)

    @field_validator("backend", mode="before")
    @classmethod
    def _vllm_unless_said(cls, value: Any) -> Any:
        if isinstance(value, dict) and "kind" not in value:
            return {**value, "kind": "vllm"}
        return value

    @model_validator(mode="after")
    def _table_output_needs_table_input(self) -> "JobSpec":
        if self.output.format == "iceberg" and not self.input.is_table:
            raise SpecError("output.format", "an Iceberg labels table records the source snapshot it covers: "
                                             "it needs an input.format iceberg or delta input")
        return self

    @model_validator(mode="after")
    def _check_labels(self) -> "JobSpec":
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"labels must be unique, got {names}")
        words = [label.word for label in self.labels]
        if len(set(words)) != len(words):
            raise ValueError(f"label answers must be unique, got {words}")
        for i, example in enumerate(self.few_shot):
            if example.label not in names:
                raise ValueError(f"few_shot[{i}].label {example.label!r} is not one of the labels {names}")
        return self

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def label_words(self) -> list[str]:
        """What the model writes for each label (its `answer`, else its name), in label order."""
        return [label.word for label in self.labels]

    @property
    def checkpoint_path(self) -> str:
        return self.output.checkpoint_path or self.output.path.rstrip("/") + "/_checkpoint"


def _key_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
        elif item in ("vllm", "openai", "classifier") and parts and parts[-1] == "backend":
            continue  # the union's tag; the user wrote backend.X, not backend.vllm.X
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> JobSpec:
    """Validate a dict into a JobSpec, raising SpecError naming the first bad key."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error(exc, source) from None


def spec_error(exc: ValidationError, source: str) -> SpecError:
    """The first problem of a pydantic validation as a SpecError naming its dotted key."""
    err = exc.errors()[0]
    key = _key_path(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and err["type"] not in ("value_error",) and not _looks_secret(key):
        msg = f"{msg} (got {excerpt(err['input'])})"
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return SpecError(key, f"{msg}{more} [in {source}]")


def _looks_secret(key: str) -> bool:
    return "key" in key.split(".")[-1]


def set_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (`3`, `true`, `[a, b]`)."""
    if "=" not in assignment:
        raise SpecError("", f"--set expects KEY=VALUE, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    set_key(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a nested dict, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(".".join(parts[: i + 1]), f"cannot set {key}: this key is not a mapping")
        node = child
    node[parts[-1]] = value


def load_spec(
    source: str | os.PathLike[str] | IO[str],
    overrides: Sequence[str] = (),
    **direct: Any,
) -> JobSpec:
    """Load a YAML spec (a path, or an open text stream such as standard input), apply
    `--set` overrides and direct keys (e.g. `input.path=...`)."""
    return parse_spec(load_spec_data(source, overrides, direct), source=source_name(source))


def source_name(source: str | os.PathLike[str] | IO[str]) -> str:
    """How errors name where a spec came from: its path, or `<stdin>`."""
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return "<stdin>" if name in (None, "<stdin>") else str(name)
    return str(source)


def load_spec_data(source: str | os.PathLike[str] | IO[str], overrides: Sequence[str], direct: dict[str, Any]) -> dict[str, Any]:
    """A YAML spec (path or stream) as a dict with `--set` overrides and direct keys applied (not yet validated)."""
    name = source_name(source)
    try:
        text = source.read() if hasattr(source, "read") else Path(source).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise SpecError("", f"spec file not found: {name}") from None
    except yaml.YAMLError as exc:
        raise SpecError("", f"{name} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError("", f"{name}: expected a mapping at the top level")
    for assignment in overrides:
        set_override(data, assignment)
    for key, value in direct.items():
        if value is not None:
            set_key(data, key, value)
    return data
