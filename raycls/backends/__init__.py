"""Backends turn prepared rows into labelled rows. They are picked by the type of `spec.backend`.

The contract, for every backend:

- input rows carry `id`, the kept input columns, `_text` (the text to classify, or None),
  `error` (None, or `empty_text` for rows that must cost no model call) and `truncated`;
- output rows carry the same `id` and kept columns plus every column of
  `raycls.schema.RESULT_COLUMNS`; exactly one output row per input row;
- a per-row failure goes to `error` (with `raw_output` kept); a fatal failure raises.

Backend modules import their heavy dependencies (vLLM, openai) lazily, so that
`import raycls` works on machines without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from raycls.config import OpenAIBackend, VLLMBackend

if TYPE_CHECKING:
    from ray.data import Dataset

    from raycls.config import JobSpec
    from raycls.prompts import PromptPlan

BackendFn = Callable[["Dataset", "JobSpec", "PromptPlan"], "Dataset"]


def _vllm(ds, spec, plan):
    from raycls.backends.vllm import label_with_vllm

    return label_with_vllm(ds, spec, plan)


def _openai(ds, spec, plan):
    from raycls.backends.openai import label_with_api

    return label_with_api(ds, spec, plan)


BACKENDS: dict[type, BackendFn] = {VLLMBackend: _vllm, OpenAIBackend: _openai}


def apply_backend(ds: "Dataset", spec: "JobSpec", plan: "PromptPlan") -> "Dataset":
    """Label every row of `ds` with the backend the spec names."""
    return BACKENDS[type(spec.backend)](ds, spec, plan)
