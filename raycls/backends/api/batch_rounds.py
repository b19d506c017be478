"""Batch mode on the driver: group rows into batch files, upload, create, poll, collect.

Every step is recorded (`raycls.backends.api.batch_state`) before the next one, so a killed driver's
successor picks up where it stopped: a record with a file but no batch is created from
that file (after looking for a batch that names it in its metadata), a record with a
batch is polled, a collected one is done. Keys rotate across batches (batch n belongs to
the n-th live key); a 401/403 drops the key for the run. At most `max_enqueued_tokens`
(estimated) are in created, unfinished batches; a batch the provider fails with
`token_limit_exceeded` keeps its file and is created again once others finish.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any, Callable

from raycls import storage
from raycls.backends.api.answers import RequestPlan, fallback
from raycls.backends.api.http import ApiStatusError
from raycls.backends.api.keys import ApiKeys
from raycls.backends.api.batch_http import BatchClient
from raycls.backends.api.batch_lines import Prior, judge, read_lines, request_line
from raycls.backends.api.batch_state import TERMINAL, BatchState, result_json
from raycls.config import OpenAIConfig
from raycls.errors import BackendError
from raycls.prompting.tokens import truncate_to_tokens

log = logging.getLogger(__name__)

Row = tuple[str, str, bool]
"""(id, text, truncated) of a row to submit."""


class BatchDriver:
    """Submits, polls and collects one output's batches."""

    def __init__(self, backend: OpenAIConfig, plan: RequestPlan, text_budget: int | None, prompt_id: str,
                 state: BatchState, keys: ApiKeys, sleep: Callable[[float], None] = time.sleep):
        self.b, self.plan, self.text_budget, self.prompt_id = backend, plan, text_budget, prompt_id
        self.state, self.keys, self.sleep = state, keys, sleep
        self.client = BatchClient(backend.base_url, timeout_s=max(backend.timeout_s, 120.0))
        self.live = list(range(len(keys.values)))
        self.fmt = plan.first_format() if plan.prompt is not None else "none"  # None: status/cancel, no requests
        self.logprobs = backend.logprobs
        self.counters: Counter[str] = Counter()
        self.started_at = storage.utc_now()
        self.records = {r["name"]: r for r in state.records()}
        self.latest = state.latest()
        self.provider_limit: int | None = None
        self.stopped_by_cancel = False
        self._healed = False
        self.texts: dict[str, Row] = {}
        """Rows submitted by this process: one that comes back for another round is resubmitted while
        waiting, without a write pass (rows of an earlier process come back through the next pass)."""
        self.requeue: list[str] = []

    # -- keys ----------------------------------------------------------------------------------

    def _call(self, fn: Callable[[str], Any], owner: str | None = None) -> tuple[Any, str]:
        """`fn(key)` with the owner's key if it is live, else the next live one; drops 401/403 keys."""
        order = sorted(self.live, key=lambda i: self.keys.labels[i] != owner)
        for index in order:
            try:
                return fn(self.keys.values[index]), self.keys.labels[index]
            except ApiStatusError as exc:
                if exc.status_code not in (401, 403):
                    raise BackendError(f"the Batch API at {self.b.base_url} answered HTTP {exc.status_code}: "
                                       f"{self.keys.redact(exc.reason)[:200]}") from None
                log.warning("dropping %s: the Batch API answered %d", self.keys.labels[index], exc.status_code)
                self.live.remove(index)
                self.counters["keys_revoked"] += 1
        raise BackendError("no usable API key left for the Batch API (every key answered 401/403); batches "
                           "recorded so far stay in the output: fix the keys and run the same command again")

    # -- what is in flight -------------------------------------------------------------------------

    def open_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if not r.get("collected") and not r.get("abandoned")]

    def in_flight_ids(self) -> set[str]:
        return {rid for r in self.open_records() for rid in r["rows"]}

    def enqueued_tokens(self) -> int:
        return sum(r["tokens"] for r in self.open_records() if r.get("batch_id"))

    def _room_for(self, tokens: int) -> bool:
        limit = min(x for x in (self.b.max_enqueued_tokens, self.provider_limit, 1 << 62) if x is not None)
        enqueued = self.enqueued_tokens()
        return enqueued == 0 or enqueued + tokens <= limit

    # -- submit ------------------------------------------------------------------------------------

    def submit(self, rows: list[Row]) -> int:
        """Group `rows` into batch files, record and upload each, create those that fit; returns files made."""
        submitted = Counter(rid for r in self.records.values() for rid in r["rows"])
        limit_tokens = self.b.max_enqueued_tokens or (1 << 62)
        group: list[tuple[str, int, bool]] = []
        content, tokens, made = bytearray(), 0, 0
        for row_id, text, truncated in rows:
            self.texts[row_id] = (row_id, text, truncated)
            if self.text_budget is not None:
                text, cut = truncate_to_tokens(text, self.text_budget)
                truncated = truncated or cut
            prior = Prior.of(self.latest.get(row_id))
            attempt = submitted[row_id]
            line, need = request_line(self.plan, self.fmt, self.logprobs, row_id, attempt, text, prior.reasks)
            if group and (len(group) >= self.b.batch_max_requests or len(content) + len(line) > self.b.batch_max_bytes
                          or tokens + need > limit_tokens):
                self._record(group, bytes(content), tokens)
                group, content, tokens, made = [], bytearray(), 0, made + 1
            group.append((row_id, attempt, truncated))
            content += line
            tokens += need
        if group:
            self._record(group, bytes(content), tokens)
            made += 1
        self.advance()
        return made

    def _record(self, group: list[tuple[str, int, bool]], content: bytes, tokens: int) -> None:
        name = self.state.next_name(list(self.records.values()))
        record = {"name": name, "rows": [g[0] for g in group], "attempts": [g[1] for g in group],
                  "truncated": [g[0] for g in group if g[2]], "tokens": tokens, "bytes": len(content),
                  "format": self.fmt, "logprobs": self.logprobs, "prepared_at": storage.utc_now(),
                  "key": self.keys.labels[self.live[len(self.records) % len(self.live)]] if self.live else None}
        self.records[name] = record
        self.state.save(record)  # before the upload: what this file holds is known even if we die now
        upload = lambda key: self.client.upload(key, content, f"raycls-{name}.jsonl")  # noqa: E731
        file, owner = self._call(upload, record["key"])
        record.update(file_id=file["id"], key=owner, status="uploaded", uploaded_at=storage.utc_now())
        self.state.save(record)
        self.counters["files_uploaded"] += 1

    def advance(self) -> None:
        """Create the batches of uploaded files while the enqueued-token limit allows, oldest first."""
        for record in self.open_records():
            if record.get("batch_id") or not record.get("file_id"):
                continue
            if not self._room_for(record["tokens"]):
                return
            create = lambda key: self.client.create(key, record["file_id"], "/v1" + self.plan.path,  # noqa: E731
                                                    self.b.batch_completion_window, {"raycls_batch": record["name"]})
            batch, owner = self._call(create, record["key"])
            record.update(batch_id=batch["id"], key=owner, status=batch.get("status"), created_at=storage.utc_now())
            self.state.save(record)  # before waiting on it
            self.counters["batches_created"] += 1

    # -- poll and collect ------------------------------------------------------------------------------

    def heal(self) -> None:
        """After a restart: a file with no recorded batch may have one (killed between create and record);
        a record with no file is abandoned (its rows are submitted again)."""
        self._healed = True
        orphans = {r["file_id"]: r for r in self.open_records() if r.get("file_id") and not r.get("batch_id")}
        for record in self.open_records():
            if not record.get("file_id"):
                record["abandoned"] = True
                self.state.save(record)
        if not orphans:
            return
        listed, _ = self._call(lambda key: self.client.list(key, limit=100))
        for batch in listed.get("data") or []:
            record = orphans.get(batch.get("input_file_id"))
            if record is not None and (batch.get("metadata") or {}).get("raycls_batch") == record["name"]:
                record.update(batch_id=batch["id"], status=batch.get("status"))
                self.state.save(record)

    def poll(self) -> int:
        """Check every created, uncollected batch once; collect the finished ones. Returns batches collected."""
        if not self._healed:
            self.heal()
        collected = 0
        for record in self.open_records():
            if not record.get("batch_id"):
                continue
            batch, _ = self._call(lambda key: self.client.retrieve(key, record["batch_id"]), record["key"])
            status = batch.get("status")
            changed = status != record.get("status") or batch.get("request_counts") != record.get("request_counts")
            record.update(status=status, request_counts=batch.get("request_counts"), checked_at=storage.utc_now())
            if status == "failed" and _error_code(batch) == "token_limit_exceeded":
                self.provider_limit = max(1, self.enqueued_tokens() - record["tokens"])
                record.update(batch_id=None, status="uploaded", token_limit_retries=record.get("token_limit_retries", 0) + 1)
                self.counters["token_limit_backoffs"] += 1
                self.state.save(record)
                continue
            if status in TERMINAL:
                self._collect(record, batch)
                collected += 1
                self.provider_limit = None  # a batch finished: room again
            elif changed:
                self.state.save(record)
        self.advance()
        return collected

    def _collect(self, record: dict[str, Any], batch: dict[str, Any]) -> None:
        contents = [self._call(lambda key: self.client.content(key, fid), record["key"])[0]
                    for fid in (batch.get("output_file_id"), batch.get("error_file_id")) if fid]
        lines, malformed = read_lines(*contents)
        self.counters["malformed_lines"] += malformed
        completed = batch["status"] == "completed" or (batch["status"] == "failed")
        cut = set(record.get("truncated") or [])
        results = []
        for row_id, attempt in zip(record["rows"], record["attempts"]):
            line = lines.get(f"{row_id}#{attempt}")
            prior = Prior.of(self.latest.get(row_id))
            verdict = judge(line, completed, prior, self.plan, record["format"], row_id in cut, self.b.max_retries,
                            self.b.max_reasks, self.b.model, self.prompt_id)
            if verdict.switch == "format" and self.fmt == record["format"]:
                self.fmt = fallback(self.fmt) or "none"
            elif verdict.switch == "logprobs":
                self.logprobs = False
            if verdict.kind != "final" and row_id in self.texts and not self._cancelled_by_us(record, batch):
                self.requeue.append(row_id)
            if verdict.kind == "unfinished":
                self.counters["rows_unfinished"] += 1
                continue
            final = verdict.kind == "final"
            self.counters["rows_final" if final else ("reasks" if verdict.prior and len(verdict.prior.reasks) > len(prior.reasks)
                                                     else "line_errors")] += 1
            after = verdict.prior or Prior()
            results.append({"id": row_id, "final": final, "result": result_json(verdict.result or {}),
                            "failures": after.failures, "reasks": json.dumps(after.reasks, ensure_ascii=False)})
        self.state.write_results(record["name"], results)
        for row in results:
            if not (self.latest.get(row["id"], {}).get("final") and not row["final"]):
                self.latest[row["id"]] = row
        if self._cancelled_by_us(record, batch):
            self.stopped_by_cancel = True
        record.update(collected=True, collected_at=storage.utc_now())
        self.state.save(record)

    def _cancelled_by_us(self, record: dict[str, Any], batch: dict[str, Any]) -> bool:
        """Cancelled through `raycls cancel` while this run was going: its rows are not resubmitted by this run."""
        return batch.get("status") == "cancelled" and record.get("cancel_requested_at", "") >= self.started_at

    def wait(self) -> None:
        """Poll until no batch is in flight (or a `raycls cancel` stopped them); collects as they finish,
        and submits the next round of rows that came back (errors, re-asks, expired) at once."""
        while any(r.get("batch_id") or r.get("file_id") for r in self.open_records()) and not self.stopped_by_cancel:
            collected = self.poll()
            if self.requeue and not self.stopped_by_cancel:
                again, self.requeue = list(dict.fromkeys(self.requeue)), []
                self.submit([self.texts[rid] for rid in again])
            elif not collected:
                self.sleep(self.b.poll_interval_s)

    def cancel_all(self) -> int:
        """Ask the provider to cancel every created, unfinished batch; recorded first."""
        asked = 0
        for record in self.open_records():
            record["cancel_requested_at"] = storage.utc_now()
            self.state.save(record)
            if record.get("batch_id") and record.get("status") not in TERMINAL:
                self._call(lambda key: self.client.cancel(key, record["batch_id"]), record["key"])
                asked += 1
        return asked


def _error_code(batch: dict[str, Any]) -> str | None:
    errors = (batch.get("errors") or {}).get("data") or []
    return errors[0].get("code") if errors and isinstance(errors[0], dict) else None


def final_results(latest: dict[str, dict[str, Any]]) -> dict[str, str]:
    """id -> result JSON of the rows with a final result (what the write pass emits)."""
    return {rid: row["result"] for rid, row in latest.items() if row["final"]}

