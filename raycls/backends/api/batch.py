"""The API backend in batch mode (`backend.mode: batch`): rows go through the provider's
Batch API at `batch_discount` of the price, answers come back minutes to hours later.

Design. Ray Data's checkpointing wants read → maps → write, and a batch's answers arrive
long after the rows were read, so the job runs in *passes* (`raycls.job.batch_job`). Each
pass is the ordinary pipeline, read → prepare → (cache lookup) → `label` → (cache
restore) → write, where `label` is one cheap map step, `take_results`: a row whose final
result was collected (it sits in the output's batch state) is emitted with it; a row
without one is recorded for submission and marked `PENDING`, which the response cache
treats as a failed answer (not stored; duplicates parked on the row share it), and
`drop_pending`, the step before the write, leaves those rows out of this pass; rows the
contract says cost no call (empty text, cache hits) pass with their error as in sync mode. Between
passes the driver submits the pending rows that no batch holds yet, waits, and collects
(`raycls.backends.api.batch_rounds`). Rows already written are skipped by Ray's checkpoint at
the read, the response cache works unchanged around the step (a hit is never pending, so
never submitted), and rows out = rows in is checked after the last pass, as always.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raycls import schema, storage
from raycls.backends.api.answers import RequestPlan
from raycls.backends.api.batch_state import write_pending
from raycls.config import JobSpec, OpenAIConfig
from raycls.backends.api.cost import api_token_budget, cost_metrics, cost_usd, minutes_at_limits
from raycls.prompting.prompts import PromptPlan
from raycls.prompting.tokens import TokenBudget

if TYPE_CHECKING:
    from ray.data import Dataset

    from raycls.backends.api.batch_rounds import BatchDriver


def api_backend(spec: JobSpec, plan: PromptPlan) -> Any:
    """The openai backend of the spec's `mode`: synchronous callers, or batch mode."""
    if spec.backend.mode == "batch":
        return BatchLabeller(spec, plan)
    from raycls.backends.api.backend import ApiLabeller

    return ApiLabeller(spec, plan)


class BatchLabeller:
    """Batch mode behind the backend contract (`raycls.backends`); `raycls.job.batch_job` drives the passes."""

    def __init__(self, spec: JobSpec, plan: PromptPlan):
        self.spec, self.plan = spec, plan
        self.backend: OpenAIConfig = spec.backend
        self.driver: "BatchDriver | None" = None
        self.pass_url: str | None = None
        self.results_ref: Any = None

    def prepare(self) -> None:
        from raycls.backends.api.keys import resolve_keys

        self.token_budget()
        resolve_keys(self.backend.api_keys)  # fail fast, before any row is read

    def start(self, state: Any) -> "BatchDriver":
        """The driver-side submitter for this output's state (keys read here, on the driver)."""
        from raycls.backends.api.keys import resolve_keys
        from raycls.backends.api.batch_rounds import BatchDriver

        self.driver = BatchDriver(self.backend, RequestPlan.build(self.backend, self.plan), self.token_budget().text,
                                  self.plan.prompt_id, state, resolve_keys(self.backend.api_keys))
        return self.driver

    def begin_pass(self, pass_url: str, finals: dict[str, str]) -> None:
        """Before a pass is built: where its pending rows go, and the results it can emit."""
        import ray

        self.pass_url = pass_url
        self.results_ref = ray.put(pa.table({"id": pa.array(list(finals), pa.string()),
                                             "result": pa.array(list(finals.values()), pa.string())}))

    def label(self, ds: "Dataset") -> "Dataset":
        if self.pass_url is None:
            raise RuntimeError("batch mode runs through raycls.job.batch_job (begin_pass before label)")
        return ds.map_batches(take_results, batch_format="pyarrow", fn_kwargs={
            "results": [self.results_ref], "pass_url": self.pass_url, "model": self.backend.model,
            "prompt_id": self.plan.prompt_id, "result_types": self.result_types()})

    def result_types(self) -> pa.Schema:
        return schema.result_schema(list(self.plan.labels))  # scored on the answer words, as sync

    def token_budget(self) -> TokenBudget:
        return api_token_budget(self.backend, self.plan)

    def stopped_early(self) -> str | None:
        return None  # rows not answered yet stay pending in the state; the next run collects them

    def fingerprint(self) -> dict[str, Any]:
        from raycls.backends.api.backend import ApiLabeller

        return ApiLabeller(self.spec, self.plan).fingerprint()

    def estimate(self, calls: int, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        """The batch price, with the synchronous price beside it."""
        sync = cost_usd(self.backend, input_tokens, output_tokens)
        return {"est_cost_usd_max": round(sync * self.backend.batch_discount, 6), "est_cost_usd_max_sync": round(sync, 6),
                "mode": "batch", "est_minutes_at_limits": minutes_at_limits(self.backend, calls, input_tokens + output_tokens)}

    def report(self, metrics: dict[str, Any]) -> dict[str, Any]:
        out = cost_metrics(self.backend, metrics)
        out["cost_usd_sync"] = out["cost_usd"]
        out["cost_usd"] = round(out["cost_usd"] * self.backend.batch_discount, 6)
        out["batch_discount"] = self.backend.batch_discount
        if self.driver is not None:
            out["batch"] = dict(self.driver.counters)
        return out

    def close(self) -> None:
        self.driver = None


PENDING = schema.DEFERRED
"""`error` of a row with no collected result yet: the response cache neither stores nor remembers
it (rows parked on it share it), and `drop_pending` leaves it out of the write."""

_INDEX: dict[str, dict[str, str]] = {}
"""Per worker process: the results table of a pass as a dict, built once per pass."""


def take_results(batch: pa.Table, results: list, pass_url: str, model: str, prompt_id: str,
                 result_types: pa.Schema) -> pa.Table:
    """Rows with a collected result, or that need no call, get their result columns; the others
    are recorded for the driver to submit and marked `PENDING` (`drop_pending` takes them out)."""
    import ray

    ref = results[0]
    key = ref.hex()
    if key not in _INDEX:
        table = ray.get(ref)
        _INDEX.clear()
        _INDEX[key] = dict(zip(table.column("id").to_pylist(), table.column("result").to_pylist()))
    index = _INDEX[key]
    ids = batch.column(schema.ID).to_pylist()
    texts = batch.column(schema.TEXT).to_pylist()
    errors = batch.column(schema.ERROR).to_pylist()
    cuts = batch.column(schema.TRUNCATED).to_pylist()
    rows = []
    pending: dict[str, list] = {"id": [], "text": [], "truncated": []}
    for rid, text, error, cut in zip(ids, texts, errors, cuts):
        row = schema.empty_result(model=model, prompt_id=prompt_id, truncated=bool(cut))
        if error or text is None:
            row[schema.ERROR] = error or schema.EMPTY_TEXT
        elif rid in index:
            row.update(json.loads(index[rid]))
        else:
            pending["id"].append(rid)
            pending["text"].append(text)
            pending["truncated"].append(bool(cut))
            row[schema.ERROR] = PENDING
        rows.append(row)
    if pending["id"]:
        write_pending(storage.join(pass_url, "submit"), pending)
    out = batch.drop_columns([c for c in (schema.ERROR, schema.TRUNCATED) if c in batch.column_names])
    for f in result_types:
        out = out.append_column(f, pa.array([row[f.name] for row in rows], f.type))
    return out


def drop_pending(batch: pa.Table, pass_url: str) -> pa.Table:
    """The pass's last step before the write: rows still `PENDING` (and rows the cache parked on them)
    are recorded by id, so the driver knows the pass is not complete, and left out for a later pass."""
    errors = batch.column(schema.ERROR).to_pylist()
    keep = [i for i, e in enumerate(errors) if e != PENDING]
    if len(keep) == batch.num_rows:
        return batch
    dropped = [rid for rid, e in zip(batch.column(schema.ID).to_pylist(), errors) if e == PENDING]
    write_pending(storage.join(pass_url, "dropped"), {"id": dropped, "text": [None] * len(dropped),
                                                      "truncated": [False] * len(dropped)})
    return batch.take(pa.array(keep, pa.int64()))
