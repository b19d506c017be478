"""The API backend: a pool of caller actors that label rows through an OpenAI-compatible API.

Each actor runs up to `max_concurrency` requests at once on one event loop (Ray Data
runs async `__call__`s of actor UDFs on a loop of their own), over one aiohttp session
(`api_http`: why not the `openai` client is said there). Retries are ours, because only
we know the shared budgets. A request takes a slot from the shared budget (`budget_client.BudgetClient`), and what
the server answers decides what happens next:

- 2xx: parse the answer; one that names no single label is re-asked (`max_reasks`),
  then the row keeps `error = unparseable_output` and its `raw_output`;
- 429: cool the key down for as long as the server says, take another slot;
- 401/403: drop the key for the rest of the run (logged once, by label). When no key
  is left, rows still unlabelled are *not written* (finished ones are), and the run ends
  with a BackendError: running the same command again with working keys labels only
  the rest (a resumed run skips written rows);
- 400 blaming the response format or logprobs: fall back and resend; blaming length: cut the text;
- timeouts, connection errors, 5xx, broken bodies: exponential backoff with jitter,
  `max_retries` times, then `error = api_error`.

aiohttp is imported inside the actors only, like vLLM in the other backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal

import pyarrow as pa

from raycls import schema
from raycls.backends.api.answers import Answer, Format, RequestPlan, error_summary, fallback, label_probs, read_answer, rejects
from raycls.backends.api.http import ApiConnectionError, ApiError, ApiSession, ApiStatusError, ApiTimeout, MalformedBody
from raycls.backends.api.keys import ApiKeys, resolve_keys
from raycls.backends.api.budget_client import BudgetClient, Stopped
from raycls.config import JobSpec, OpenAIConfig
from raycls.errors import BackendError
from raycls.backends.api.cost import api_token_budget, cost_metrics, cost_usd, minutes_at_limits
from raycls.prompting.tokens import TokenBudget, truncate_to_tokens
from raycls.prompting.prompts import PromptPlan
from raycls.backends.api.ratelimit import exhausted_for_s, retry_after_s, start_budget_actor

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

RATE_LIMIT_RETRIES = 30
"""429s one request may meet before its row fails (each one also cools its key down)."""
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


class RowAbandoned(Exception):
    """The run is stopping (no usable key): this row is left out, for a later run to label."""


@dataclass(frozen=True)
class Outcome:
    """What a failed request means for its row (see `ApiCaller._failed`)."""

    action: Literal["again", "rate_limited", "too_long", "retry", "fail"]
    """`again`: resend at once (a key was dropped, the request shape changed); `rate_limited`:
    a 429, the key cools down; `too_long`: cut the text and resend; `retry`: back off, then
    resend; `fail`: the row fails with `detail`."""
    detail: str = ""


class RowFailed(Exception):
    """This row cannot be labelled: `code` goes to `error`, `detail` to `raw_output`."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


class ApiLabeller:
    """The API backend behind the contract in `raycls.backends`: caller actors plus one
    budget actor that the run owns from `prepare` to `close`."""

    def __init__(self, spec: JobSpec, plan: PromptPlan):
        self.spec, self.plan = spec, plan
        self.backend: OpenAIConfig = spec.backend  # the registry picked this class by the config's type
        self.budget: Any = None
        self.key_check: tuple[str, str] | None = None

    def prepare(self) -> None:
        """Check the context budget and the keys, start the budget actor: before any call."""
        self.token_budget()  # a context too small for the prompt fails here
        keys = resolve_keys(self.backend.api_keys)  # fail fast on the driver; the values stay here
        salt = secrets.token_hex(8)
        self.key_check = (salt, _keys_digest(keys, salt))
        labels = list(keys.labels)
        del keys
        b = self.backend
        self.budget = start_budget_actor(
            f"raycls-budget-{uuid.uuid4().hex[:12]}", labels, b.rpm, b.tpm, b.rate_window_s, b.timeout_s, b.max_cost,
        )

    def label(self, ds: "Dataset") -> "Dataset":
        import ray.data

        if self.budget is None:
            self.prepare()
        # Let a BackendError raised in a caller reach the driver as itself (Ray Data would wrap
        # it in UserCodeException), so the CLI can print its message instead of a traceback.
        ds.context.raise_original_map_exception = True
        return ds.map_batches(
            ApiCaller,
            fn_constructor_kwargs={"spec": self.spec, "plan": self.plan, "budget": self.budget, "key_check": self.key_check},
            # Two blocks at once per actor, so a block's slow last rows do not idle the pool.
            compute=ray.data.ActorPoolStrategy(size=self.backend.actors, max_tasks_in_flight_per_actor=4, max_concurrent_calls_per_actor=2),
            batch_size=self.backend.batch_size,
            batch_format="pyarrow",
            num_cpus=self.backend.num_cpus,
        )

    def result_types(self) -> pa.Schema:
        return schema.result_schema(list(self.plan.labels))  # scored on the answer words

    def token_budget(self) -> TokenBudget:
        return api_token_budget(self.backend, self.plan)

    def fingerprint(self) -> dict[str, Any]:
        b = self.backend
        return {
            "kind": b.kind, "base_url": b.base_url, "model": b.model, "endpoint": b.endpoint,
            "response_format": b.response_format, "temperature": b.temperature, "max_tokens": b.max_tokens,
            "context_window": b.context_window, "max_reasks": b.max_reasks, "extra_body": b.extra_body,
        }

    def estimate(self, calls: int, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        """The most the run can cost at the backend's prices, and its minutes at the keys' limits."""
        return {"est_cost_usd_max": round(cost_usd(self.backend, input_tokens, output_tokens), 6),
                "est_minutes_at_limits": minutes_at_limits(self.backend, calls, input_tokens + output_tokens)}

    def report(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Cost from the output's tokens, plus the run's request figures from the budget actor."""
        import ray

        out = cost_metrics(self.backend, metrics)
        if self.budget is not None:
            stats = ray.get(self.budget.stats.remote(), timeout=30)
            stats.pop("stopped", None)
            out["api"] = stats
        return out

    def stopped_early(self) -> str | None:
        """Why callers gave up on rows: no usable key left, the cost cap reached, or the budget actor gone."""
        import ray

        if self.budget is None:
            return None
        try:
            stopped = ray.get(self.budget.stats.remote(), timeout=30).get("stopped")
        except Exception as exc:
            return f"the API budget actor died during the run ({type(exc).__name__})"
        return f"{stopped}; fix the keys (or the budget)" if stopped else None

    def close(self) -> None:
        if self.budget is not None:
            import ray

            ray.kill(self.budget)
            self.budget = None


def _keys_digest(keys: ApiKeys, salt: str) -> str:
    """A salted digest of the keys, so actors can check they read the same keys as the driver."""
    return hashlib.sha256((salt + "\0" + "\0".join(keys.values)).encode()).hexdigest()


class ApiCaller:
    """One caller actor: labels a batch with many requests in flight. Ray Data builds and feeds it."""

    def __init__(self, spec: JobSpec, plan: PromptPlan, budget: Any, key_check: tuple[str, str]):
        self.backend: OpenAIConfig = spec.backend
        self.plan = RequestPlan.build(self.backend, plan)
        self.prompt_id = plan.prompt_id
        self.text_budget = api_token_budget(self.backend, plan).text
        self.result_types = schema.result_schema(list(plan.labels))
        self.keys = resolve_keys(self.backend.api_keys)
        salt, digest = key_check
        if _keys_digest(self.keys, salt) != digest:
            raise BackendError(
                f"the API keys read on this worker ({', '.join(self.keys.labels)}) differ from the driver's: "
                "make the variables or key files in backend.api_keys the same on every node"
            )
        self.budget_actor = budget
        self.format: Format = self.plan.first_format()
        self.logprobs = self.backend.logprobs
        self._started = False

    def _start(self) -> None:
        """HTTP session, semaphore and budget client, created on the actor's event loop."""
        self.http = ApiSession(self.backend.base_url, self.backend.timeout_s, connections=self.backend.max_concurrency)
        self.semaphore = asyncio.Semaphore(self.backend.max_concurrency)
        self.budget = BudgetClient(self.budget_actor)
        self._started = True

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        if not self._started:
            self._start()
        texts = batch.column(schema.TEXT).to_pylist()
        errors = batch.column(schema.ERROR).to_pylist()
        truncated = batch.column(schema.TRUNCATED).to_pylist()
        tasks = [asyncio.create_task(self._label(t, e, c)) for t, e, c in zip(texts, errors, truncated)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        finally:
            await self.budget.flush()
        keep = [i for i, row in enumerate(results) if row is not None]
        rows = [results[i] for i in keep]
        out = batch.drop_columns([c for c in (schema.ERROR, schema.TRUNCATED) if c in batch.column_names])
        if len(keep) < len(results):  # the run is stopping: unlabelled rows are left for the next run
            out = out.take(pa.array(keep, pa.int64()))
        for field in self.result_types:
            out = out.append_column(field, pa.array([row[field.name] for row in rows], field.type))
        yield out

    # -- one row --------------------------------------------------------------------------

    async def _label(self, text: str | None, error: str | None, truncated: bool) -> dict[str, Any] | None:
        """The row's result columns; None when the run is stopping and the row is left out."""
        row = schema.empty_result(model=self.backend.model, prompt_id=self.prompt_id, truncated=bool(truncated))
        if error or text is None:
            row[schema.ERROR] = error or schema.EMPTY_TEXT
            return row
        if self.text_budget is not None:
            text, cut = truncate_to_tokens(text, self.text_budget)
            row[schema.TRUNCATED] = row[schema.TRUNCATED] or cut
        reasks: list[str] = []
        while True:
            try:
                answer, fmt, text = await self._ask(text, reasks, row)
            except RowAbandoned:
                return None
            except RowFailed as failed:
                row[schema.ERROR], row[schema.RAW_OUTPUT] = failed.code, failed.detail
                return row
            parsed = self.plan.parse(answer.text, fmt)
            row[schema.RAW_OUTPUT] = answer.text
            row[schema.MULTI_LABEL] = row[schema.MULTI_LABEL] or parsed.multi_label
            if parsed.label is not None:
                probs = label_probs(answer, self.plan.labels, as_json=self.plan.parses_json(fmt))
                row.update({
                    schema.LABEL: parsed.label,
                    schema.REASONING: parsed.reasoning,
                    schema.LABEL_PROBS: probs,
                    schema.CONFIDENCE: probs.get(parsed.label) if probs else None,
                })
                return row
            if len(reasks) >= self.backend.max_reasks:
                row[schema.ERROR] = schema.UNPARSEABLE
                return row
            reasks.append(answer.text)
            self.budget.counters["reasks"] += 1

    async def _ask(self, text: str, reasks: list[str], row: dict[str, Any]) -> tuple[Answer, Format, str]:
        """One answer for the row, through rate limits, key failures and retries."""
        retries = rate_limited = 0
        while True:
            fmt, logprobs = self.format, self.logprobs
            body = self.plan.request(text, fmt, logprobs, reasks)
            tokens_in = self.plan.estimate_input_tokens(text, reasks)
            reserve = tokens_in + self.plan.max_tokens
            if reserve > self.backend.tpm:
                raise RowFailed(schema.API_ERROR, f"a request needs ~{reserve} tokens, more than backend.tpm={self.backend.tpm}")
            async with self.semaphore:
                try:
                    slot = await self.budget.take(reserve, cost_usd(self.backend, tokens_in, self.plan.max_tokens))
                except Stopped as stop:
                    if stop.reason == "max_cost":
                        raise RowFailed(schema.BUDGET_EXHAUSTED, str(stop)) from None
                    raise RowAbandoned() from None
                sent_at = time.time()
                try:
                    raw = await self.http.post(self.plan.path, body, self.keys.values[slot.key])
                    answer = read_answer(raw.body, chat=self.backend.endpoint == "chat")
                except (ApiError, ValueError) as exc:  # HTTP, connection and answer-shape errors only
                    self.budget.done(slot, sent_at, None)
                    outcome = await self._failed(exc, slot.key, fmt, logprobs)
                else:
                    used = (answer.input_tokens or 0) + (answer.output_tokens or 0) or None
                    cost = cost_usd(self.backend, answer.input_tokens or 0, answer.output_tokens or 0)
                    self.budget.done(slot, sent_at, used, cost, ok=True)
                    self.budget.counters["requests_ok"] += 1
                    row[schema.INPUT_TOKENS] += answer.input_tokens if answer.input_tokens is not None else tokens_in
                    row[schema.OUTPUT_TOKENS] += answer.output_tokens or 0
                    pause = exhausted_for_s(raw.headers, reserve)
                    if pause:
                        await self.budget.cooldown(slot.key, pause)
                    return answer, fmt, text
            if outcome.action == "rate_limited":
                rate_limited += 1
                if rate_limited > RATE_LIMIT_RETRIES:
                    raise RowFailed(schema.API_ERROR, f"rate limited (HTTP 429) {rate_limited} times")
            elif outcome.action == "too_long":
                if len(text) < 2:
                    raise RowFailed(schema.API_ERROR, "the server says the prompt is too long even without the text")
                text = text[: len(text) // 2]
                row[schema.TRUNCATED] = True
            elif outcome.action == "retry":
                retries += 1
                if retries > self.backend.max_retries:
                    raise RowFailed(schema.API_ERROR, f"{outcome.detail} (after {self.backend.max_retries} retries)")
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (retries - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            elif outcome.action == "fail":
                raise RowFailed(schema.API_ERROR, outcome.detail)
            # "again": a key was dropped or the request shape changed; resend at once.

    async def _failed(self, exc: Exception, key: int, fmt: Format, logprobs: bool) -> Outcome:
        """Classify a failed request, act on the key or the request shape; says what to do next."""
        summary = self.keys.redact(error_summary(exc))
        counters = self.budget.counters
        http = exc if isinstance(exc, ApiStatusError) else None
        status = http.status_code if http is not None else None
        if status is not None:
            counters[f"http_{status}"] += 1
        if http is not None and status == 429:
            await self.budget.cooldown(key, retry_after_s(http.headers))
            return Outcome("rate_limited")
        if status in (401, 403):
            await self.budget.revoke(key, status)
            return Outcome("again")
        if status == 404:
            raise BackendError(
                f"{self.backend.base_url} answered 404 ({summary}): check backend.base_url and "
                f"backend.model ({self.backend.model!r}) and backend.endpoint ({self.backend.endpoint})"
            )
        if http is not None and status in (400, 422):
            message = http.reason
            if fmt != "none" and rejects(message, "format"):
                self._fall_back(fmt)
                return Outcome("again")
            if logprobs and rejects(message, "logprobs"):
                if self.logprobs:
                    log.warning("the server rejected logprobs; continuing without confidence")
                self.logprobs = False
                return Outcome("again")
            if rejects(message, "too_long"):
                return Outcome("too_long")
            return Outcome("fail", summary)
        if status is not None:
            return Outcome("retry", summary) if status >= 500 or status in (408, 409) else Outcome("fail", summary)
        if isinstance(exc, ApiTimeout):
            counters["timeouts"] += 1
        elif isinstance(exc, ApiConnectionError):
            counters["connection_errors"] += 1
        elif isinstance(exc, (MalformedBody, ValueError)):  # a broken body or answer
            counters["malformed_responses"] += 1
        return Outcome("retry", summary)

    def _fall_back(self, fmt: Format) -> None:
        if self.format != fmt:
            return  # another row already fell back from this format
        weaker = fallback(fmt)
        log.warning("the server rejected response_format %s; falling back to %s", fmt, weaker or "plain text")
        self.format = weaker or "none"
        self.budget.counters[f"format_fallback_{fmt}"] += 1
