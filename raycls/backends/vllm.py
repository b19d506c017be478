"""The vLLM backend: a pool of engine actors through `ray.data.llm`.

Ray's processor already does the engine pool, GPU pinning, tensor parallelism and
batching. Around it we add: prompts truncated to the context window, labels constrained
with structured outputs (`choice` for a bare label, a JSON schema with a `label` enum
otherwise, so an out-of-set label cannot be generated), and per-label probabilities read
from the raw logprobs of each label's first token (`logprob_token_ids`).

vLLM is imported only inside the engine actors, so `import raycls` needs no vLLM.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from raycls import schema
from raycls.config import JobSpec, VLLMConfig
from raycls.prompting.labels import (
    choice_spec,
    first_tokens,
    json_schema,
    label_logprobs_from_tokens,
    parse_answer,
    probs_from_logprobs,
)
from raycls.prompting.model import resolve_model
from raycls.prompting.prompts import PromptPlan
from raycls.job.session import cluster_has_gpus
from raycls.prompting.tokens import TokenBudget, answer_tokens, text_budget

log = logging.getLogger(__name__)

_ERROR_KEY = "__inference_error__"
"""Ray's processor lets rows with this key set skip the engine: how empty rows cost no call."""


@dataclass(frozen=True)
class EnginePlan:
    """Everything the per-row steps need, computed once on the driver."""

    model: str
    """What the user named (for the `model` column)."""
    model_path: str
    """What vLLM loads."""
    prompt: PromptPlan
    chat: bool
    """Whether the model's chat template wraps the prompt."""
    choices: tuple[str, ...]
    """The exact strings the engine may write for a bare-label answer."""
    label_tokens: dict[str, int]
    """First token of each label as written in the answer, for its logprob."""
    text_budget: int
    """Tokens left for the row's text once the prompt, answer and slack are paid for."""
    sampling_params: dict[str, Any]
    prompt_tokens: int
    """Tokens of the fixed part of the prompt (as the engine sees it)."""

    @property
    def token_budget(self) -> TokenBudget:
        return TokenBudget(self.prompt_tokens, self.sampling_params["max_tokens"], self.text_budget, self.model_path)

    @property
    def score_labels(self) -> bool:
        """Whether first-token probabilities tell the labels apart (no two share a first token)."""
        return len(set(self.label_tokens.values())) == len(self.label_tokens)


@functools.lru_cache(maxsize=2)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def plan_engine(backend: VLLMConfig, plan: PromptPlan) -> EnginePlan:
    """Resolve the model and work out prompts, constraints and budgets for this job."""
    model_path = resolve_model(backend.model)
    tok = _tokenizer(model_path)
    chat = bool(getattr(tok, "chat_template", None))
    prefix = "" if chat else plan.answer_prefix
    labels = list(plan.labels)
    encode = functools.partial(tok.encode, add_special_tokens=False)
    if plan.expects_json:
        constraint = {"json": json_schema(labels, plan.reasoning)}
        label_tokens = first_tokens(labels, encode)
        choices: tuple[str, ...] = ()
    else:
        choices = tuple(prefix + label for label in labels)
        constraint = choice_spec(list(choices))
        label_tokens = dict(zip(labels, (encode(c)[0] for c in choices)))
    max_tokens = answer_tokens(backend.max_tokens, plan, list(choices), count=lambda s: len(encode(s)))
    fixed = len(encode(_wrap(tok, plan.fixed_text, chat)))
    budget = text_budget(backend.max_model_len, fixed, max_tokens, "backend.max_model_len")
    assert budget is not None
    sampling = {
        "temperature": backend.temperature,
        "max_tokens": max_tokens,
        "structured_outputs": constraint,
        # vLLM returns the logprobs of exactly these tokens (raw, before the constraint).
        "logprobs": len(set(label_tokens.values())),
        "logprob_token_ids": sorted(set(label_tokens.values())),
    }
    return EnginePlan(backend.model, model_path, plan, chat, choices, label_tokens, budget, sampling, fixed)


def _wrap(tok, text: str, chat: bool) -> str:
    if not chat:
        return text
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def render_batch(batch: pa.Table, engine: EnginePlan) -> pa.Table:
    """Truncate each text to the budget and render the engine prompt (`_prompt`)."""
    tok = _tokenizer(engine.model_path)
    texts = batch.column(schema.TEXT).to_pylist()
    truncated = batch.column(schema.TRUNCATED).to_pylist()
    present = [i for i, t in enumerate(texts) if t is not None]
    encoded = tok([texts[i] for i in present], add_special_tokens=False)["input_ids"] if present else []
    prompts: list[str | None] = [None] * len(texts)
    for i, ids in zip(present, encoded):
        text = texts[i]
        if len(ids) > engine.text_budget:
            text = tok.decode(ids[: engine.text_budget])
            truncated[i] = True
        prompts[i] = _wrap(tok, engine.prompt.render(text), engine.chat)
    batch = batch.set_column(batch.schema.get_field_index(schema.TRUNCATED), schema.TRUNCATED, pa.array(truncated, pa.bool_()))
    return batch.append_column(schema.PROMPT, pa.array(prompts, pa.string()))


def to_request(row: dict[str, Any], engine: EnginePlan) -> dict[str, Any]:
    """The processor's input for one row; rows already failed skip the engine."""
    # Every row carries the key: in a block where some rows have it, Arrow gives the others
    # None, and Ray's processor treats anything but "" as an error to skip.
    return {
        "prompt": row[schema.PROMPT] or "",
        "sampling_params": engine.sampling_params,
        _ERROR_KEY: row[schema.ERROR] or "",
    }


def from_output(row: dict[str, Any], engine: EnginePlan) -> dict[str, Any]:
    """Turn the engine's output into result columns, keeping the input columns."""
    raw = row.get("generated_text") or ""
    labels = list(engine.prompt.labels)
    parsed = parse_answer(raw, labels, engine.prompt.expects_json)
    position = _label_position(row, engine) if engine.prompt.expects_json else 0
    probs = _label_probs(row.get("logprobs"), position, engine.label_tokens)
    label = parsed.label
    if engine.prompt.expects_json and probs and not _spelled_canonically(row, position, label, engine):
        probs = None  # the label was written with other tokens: its first-token figures would mislead
    if label and probs and engine.score_labels and not engine.prompt.expects_json:
        # Constrained decoding can spell a label through a shared prefix token (" S" + "ports")
        # that none of the labels' own first tokens would have won; the label whose first
        # token is most probable is the model's actual preference.
        label = max(probs, key=probs.__getitem__)
    result = schema.empty_result(
        label=label,
        reasoning=parsed.reasoning,
        raw_output=raw,
        multi_label=parsed.multi_label,
        error=None if parsed.label else schema.UNPARSEABLE,
        label_probs=probs,
        confidence=probs.get(label) if probs and label else None,
        truncated=bool(row.get(schema.TRUNCATED)),
        input_tokens=int(row.get("num_input_tokens") or 0),
        output_tokens=int(row.get("num_generated_tokens") or 0),
    )
    return {**_passthrough(row), **result}


def _passthrough(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_") and k not in _ENGINE_KEYS}


_ENGINE_KEYS = {
    "prompt", "sampling_params", "prompt_token_ids", "generated_tokens", "generated_text",
    "num_input_tokens", "num_generated_tokens", "embeddings", "metrics", "logprobs",
    "prompt_logprobs", "request_id", "batch_uuid", "time_taken_llm", "params",
}


def _label_probs(logprobs: Any, position: int | None, label_tokens: dict[str, int]) -> dict[str, float] | None:
    if not logprobs or position is None or position >= len(logprobs):
        return None
    step = logprobs[position]
    token_logprobs = {int(k): float(v["logprob"]) for k, v in step.items() if v is not None}
    return probs_from_logprobs(label_logprobs_from_tokens(token_logprobs, label_tokens))


def _spelled_canonically(row: dict[str, Any], position: int | None, label: str | None, engine: EnginePlan) -> bool:
    tokens = list(row.get("generated_tokens") or [])
    return label is not None and position is not None and tokens[position] == engine.label_tokens.get(label)


def _label_position(row: dict[str, Any], engine: EnginePlan) -> int | None:
    """Index of the generated token that starts the label's value in a JSON answer.

    Found by decoding growing prefixes rather than by counting characters: a prefix that
    ends inside a multi-byte character decodes to a replacement mark of another length.
    """
    tokens = list(row.get("generated_tokens") or [])
    raw = row.get("generated_text") or ""
    if '"label"' not in raw:
        return None
    tok = _tokenizer(engine.model_path)
    for i in range(1, len(tokens)):
        prefix = tok.decode(tokens[:i])
        key = prefix.rfind('"label"')
        if key >= 0 and prefix.endswith('"') and prefix[key + len('"label"'):].strip(' :"') == "":
            return i
    return None


def finish_failed(row: dict[str, Any], engine: EnginePlan) -> dict[str, Any]:
    """Rows that skipped the engine (or that it failed) come back with their error kept."""
    error = row.get(schema.ERROR) or row.get(_ERROR_KEY)
    if row.get(schema.ERROR) is None:
        error = schema.ENGINE_ERROR
        log.warning("engine failed on row %s: %s", row.get(schema.ID), row.get(_ERROR_KEY))
    result = schema.empty_result(error=error, raw_output=row.get("generated_text") or None, truncated=bool(row.get(schema.TRUNCATED)))
    return {**_passthrough(row), **result}


def complete_row(row: dict[str, Any], engine: EnginePlan, prompt_id: str) -> dict[str, Any]:
    """Give every row the same columns: Ray's processor returns skipped rows as they went in."""
    if _ERROR_KEY in row and row.get(_ERROR_KEY):
        row = finish_failed(row, engine)
    row.pop(_ERROR_KEY, None)
    row[schema.MODEL] = engine.model
    row[schema.PROMPT_ID] = prompt_id
    return row


CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    # vLLM's CPU build binds its compute threads to the cores of the node ("auto", one per
    # physical core) but keeps one core back for its scheduler process: half the machine on a
    # 2-core node. Its scheduler is light next to the forward passes, so none is kept back:
    # 1.7x rows/s on 2 cores (BENCHMARKS.md, "Pipeline efficiency").
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}
"""Environment of CPU engines; a variable set in the driver's environment wins (e.g.
`VLLM_CPU_OMP_THREADS_BIND=0-7|8-15` to give two engines of one node their own cores)."""
_CPU_ENV_PASSED = ("VLLM_CPU_OMP_THREADS_BIND",)

CPU_SCHEDULER = {"max_num_batched_tokens": 2048, "max_num_seqs": 128, "enable_prefix_caching": True}
"""Scheduler settings of CPU engines, the fastest measured for short classification prompts
(8192 tokens per step: 0.68x; 512: 0.89x): passed to both arms of the efficiency benchmark.
Prefix caching reuses the instruction and label block every prompt starts with."""


def cpu_engine_env() -> dict[str, str]:
    """`CPU_ENGINE_ENV` with the driver's own `VLLM_CPU_*` settings on top."""
    import os

    names = (*CPU_ENGINE_ENV, *_CPU_ENV_PASSED)
    return {**CPU_ENGINE_ENV, **{k: os.environ[k] for k in names if k in os.environ}}


def engine_kwargs(backend: VLLMConfig, on_gpu: bool) -> dict[str, Any]:
    """What each engine is given: the spec's `engine_kwargs` over the settings raycls picks
    for the device (a CPU engine gets float32 for `dtype: auto`, a GPU one keeps `auto`)."""
    tp = max(backend.gpus_per_engine, 1) if on_gpu else 1
    return {
        "max_model_len": backend.max_model_len,
        "dtype": backend.dtype if backend.dtype != "auto" or on_gpu else "float32",
        "tensor_parallel_size": tp,
        # Small models fill a JSON answer with whitespace up to max_tokens when the grammar
        # allows it; compact JSON leaves them nothing to write but the fields.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        **({} if on_gpu else {"enforce_eager": True, **CPU_SCHEDULER}),
        **backend.engine_kwargs,
    }


def processor_config(backend: VLLMConfig, engine: EnginePlan, on_gpu: bool):
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs: dict[str, Any] = {}
    if not on_gpu:
        kwargs["placement_group_config"] = {"bundles": [{"CPU": 1}]}
        kwargs["runtime_env"] = {"env_vars": cpu_engine_env()}
    return vLLMEngineProcessorConfig(
        model_source=engine.model_path,
        engine_kwargs=engine_kwargs(backend, on_gpu),
        concurrency=backend.engines,
        batch_size=backend.batch_size,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
        **kwargs,
    )


def engines_on_gpu(backend: VLLMConfig) -> bool:
    """GPU engines or the CPU build, as `backend.device` says (see `VLLMConfig.device`)."""
    if backend.device == "cpu" or backend.gpus_per_engine == 0:
        return False
    return backend.device == "gpu" or cluster_has_gpus()


class VLLMLabeller:
    """The vLLM backend behind the contract in `raycls.backends`."""

    def __init__(self, spec: JobSpec, plan: PromptPlan):
        self.backend: VLLMConfig = spec.backend  # the registry picked this class by the config's type
        self.plan = plan
        self.engine: EnginePlan | None = None

    def prepare(self) -> None:
        self.engine = plan_engine(self.backend, self.plan)

    def label(self, ds):
        from ray.data.llm import build_processor

        engine = self.engine or plan_engine(self.backend, self.plan)
        on_gpu = engines_on_gpu(self.backend)
        if not on_gpu:
            log.info("no GPUs requested or found: running vLLM on CPUs")
        ds = ds.map_batches(render_batch, fn_kwargs={"engine": engine}, batch_format="pyarrow")
        processor = build_processor(
            processor_config(self.backend, engine, on_gpu),
            preprocess=functools.partial(to_request, engine=engine),
            postprocess=functools.partial(from_output, engine=engine),
        )
        ds = processor(ds)
        return ds.map(complete_row, fn_kwargs={"engine": engine, "prompt_id": self.plan.prompt_id})

    def token_budget(self) -> TokenBudget:
        return (self.engine or plan_engine(self.backend, self.plan)).token_budget

    def result_types(self) -> pa.Schema:
        return schema.result_schema(list(self.plan.labels))  # scored on the answer words

    def fingerprint(self) -> dict[str, Any]:
        """What the engines are given, as resolved for this cluster: the engine arguments
        (`dtype: auto` is float32 on CPUs and the model's own type on GPUs), the sampling
        parameters (constraint, label tokens, answer cap) and the text budget."""
        engine = self.engine or plan_engine(self.backend, self.plan)
        given = engine_kwargs(self.backend, engines_on_gpu(self.backend))
        return {
            "kind": self.backend.kind, "model": self.backend.model, "chat": engine.chat,
            "engine_kwargs": {k: v for k, v in given.items() if k not in _ENGINE_KWARGS_NOT_IN_LABELS},
            "sampling_params": engine.sampling_params, "text_budget": engine.text_budget,
        }

    def estimate(self, calls: int, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        return {}  # no price, no rate limits: the dry run's token counts are the whole story

    def report(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {}

    def stopped_early(self) -> str | None:
        return None  # a failed row is written with its error; nothing is left out

    def close(self) -> None:
        pass


_ENGINE_KWARGS_NOT_IN_LABELS = frozenset({
    "enable_prefix_caching", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
    "swap_space", "enforce_eager", "disable_log_stats", "block_size", "enable_chunked_prefill",
})
"""`engine_kwargs` that change speed or memory, not what the engine answers."""
