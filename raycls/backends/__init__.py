"""Backends turn prepared rows into labelled rows, behind one small interface.

Every backend is a class built from the job spec (`Backend(spec, plan)`) and registered
by the type of its config (`register(ConfigType, "module:Class")`), so the pipeline picks
one without an if/elif chain and imports its module only when a job uses it. The pipeline
calls these methods and nothing else:

- `prepare()` on the driver, before any row is read: resolve the model or keys, check
  budgets, start shared actors. Raises a `RayclsError` naming the key for what the user
  must fix; nothing has been spent yet.
- `label(ds) -> ds`: the lazy labelling steps. Input rows carry `id`, the kept input
  columns, `_text` (the text to classify, or None), `error` (None, or `empty_text` for rows
  that must cost no model call) and `truncated`; output rows carry the same `id` and
  kept columns plus every column of `raycls.schema.RESULT_COLUMNS`, exactly one output
  row per input row. A per-row failure goes to `error` (with `raw_output` kept); a fatal
  failure raises. (The pipeline checks rows out = rows in at run time anyway.)
- `result_types() -> pa.Schema`: the Arrow types of the result columns `label` writes, in
  the backend's own terms: `label` and the fields of `label_probs` are the answers it was
  scored on (a label's `answer` word for a model, the head's label names for a classifier).
  The pipeline maps them to the user's names afterwards (`raycls.quality.calibration`); wrappers
  (the response cache) keep rows in these terms.
- `token_budget() -> TokenBudget`: how a row's request is sized (prompt, answer cap, the
  text's budget, the tokenizer when there is one), so `--dry-run` counts what the run does.
  Raises SpecError, naming the key, when the context cannot hold the prompt and answer.
- `fingerprint() -> dict`: every backend setting that can change a label (model,
  sampling, response format, endpoint, ...), for the resume check.
- `estimate(calls, input_tokens, output_tokens) -> dict`: the backend's own figures for
  `--dry-run` (the API backend's cost and minutes at its keys' limits); `{}` when it has none.
- `report(metrics) -> dict`: the backend's own figures for `metrics.json` (cost, request
  counters).
- `stopped_early() -> str | None`: why the backend gave up on rows this run and left them
  out (the API backend once no key is usable), or None. Asked when rows are missing at the
  end: the run is not marked finished, and the user is told why in one line.
- `close()`: release what `prepare` started; called in a `finally`, also after a failure.

Backend modules import their heavy dependencies (vLLM, openai, torch) lazily, so that
`import raycls` works on machines without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from raycls.config import ClassifierConfig, OpenAIConfig, VLLMConfig

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.data import Dataset

    from raycls.config import JobSpec
    from raycls.prompting.prompts import PromptPlan
    from raycls.prompting.tokens import TokenBudget


class Backend(Protocol):
    """What the pipeline needs of a backend; see the module docstring for each method."""

    def __init__(self, spec: "JobSpec", plan: "PromptPlan") -> None: ...

    def prepare(self) -> None: ...

    def label(self, ds: "Dataset") -> "Dataset": ...

    def result_types(self) -> "pa.Schema": ...

    def token_budget(self) -> "TokenBudget": ...

    def fingerprint(self) -> dict[str, Any]: ...

    def estimate(self, calls: int, input_tokens: int, output_tokens: int) -> dict[str, Any]: ...

    def report(self, metrics: dict[str, Any]) -> dict[str, Any]: ...

    def stopped_early(self) -> str | None: ...

    def close(self) -> None: ...


_REGISTRY: dict[type, str] = {}
"""Backend config type -> "module:Class" of its implementation (imported on first use)."""


def register(config_type: type, implementation: str) -> None:
    """Make `implementation` ("package.module:Class") the backend for specs whose
    `backend` is a `config_type`."""
    _REGISTRY[config_type] = implementation


def backend_class(config_type: type) -> type:
    """The registered implementation for a backend config type."""
    try:
        module, name = _REGISTRY[config_type].split(":")
    except KeyError:
        raise TypeError(f"no backend registered for {config_type.__name__}") from None
    return getattr(importlib.import_module(module), name)


def create_backend(spec: "JobSpec", plan: "PromptPlan") -> Backend:
    """The backend the spec names, built but not yet prepared. (The job puts it behind the
    response cache: `raycls.backends.cache.wrap`.)"""
    return backend_class(type(spec.backend))(spec, plan)


register(VLLMConfig, "raycls.backends.vllm:VLLMLabeller")
register(OpenAIConfig, "raycls.backends.api.batch:api_backend")  # sync callers, or batch mode
register(ClassifierConfig, "raycls.backends.classifier:ClassifierLabeller")
