"""Batch mode's lines: a row's request as a line of the uploaded JSONL, and a line of the
output or error file back into the row's result columns. Pure functions, no I/O.

The request body is the synchronous path's (`RequestPlan.request`), and an answer is
read and scored by the same code (`read_answer`, `RequestPlan.parse`, `label_probs`), so
both modes label a row alike. `custom_id` is `<row id>#<attempt>`: a line from an earlier
attempt (a batch collected late) is recognised and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from raycls import schema
from raycls.backends.api.answers import Format, RequestPlan, label_probs, read_answer, rejects

UNFINISHED = ("batch_expired", "batch_cancelled", "batch_failed")
"""Per-line error codes of requests the provider never ran: the row is resubmitted, not charged a failure."""


def custom_id(row_id: str, attempt: int) -> str:
    return f"{row_id}#{attempt}"


def split_custom_id(cid: str) -> tuple[str, int] | None:
    row_id, sep, attempt = cid.rpartition("#")  # ids may hold '#' (duplicate ids get '#n'): the last one is ours
    return (row_id, int(attempt)) if sep and attempt.isdigit() else None


def request_line(plan: RequestPlan, fmt: Format, logprobs: bool, row_id: str, attempt: int,
                 text: str, reasks: list[str]) -> tuple[bytes, int]:
    """The JSONL line for one row, and its estimated tokens (input + answer cap) for the enqueued limit."""
    body = plan.request(text, fmt, logprobs, reasks)
    line = {"custom_id": custom_id(row_id, attempt), "method": "POST", "url": "/v1" + plan.path, "body": body}
    tokens = plan.estimate_input_tokens(text, reasks) + plan.max_tokens
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"), tokens


def read_lines(*contents: bytes) -> tuple[dict[str, dict], int]:
    """custom_id -> line over output and error files; and how many lines were malformed."""
    lines: dict[str, dict] = {}
    malformed = 0
    for content in contents:
        for raw in content.splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                cid = line["custom_id"]
            except (ValueError, KeyError, TypeError):
                malformed += 1
                continue
            if isinstance(cid, str):
                lines[cid] = line
    return lines, malformed


@dataclass
class Prior:
    """What earlier rounds left for a row: failures and re-asks so far, tokens spent."""

    failures: int = 0
    reasks: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def of(cls, record: dict[str, Any] | None) -> "Prior":
        if not record or record.get("final"):
            return cls()
        spent = json.loads(record["result"]) if record.get("result") else {}
        return cls(record.get("failures") or 0, json.loads(record.get("reasks") or "[]"),
                   spent.get(schema.INPUT_TOKENS, 0), spent.get(schema.OUTPUT_TOKENS, 0))


@dataclass(frozen=True)
class Verdict:
    """What one row's line means: `final` (write it), `again` (next round, a failure or re-ask
    counted), or `unfinished` (never ran: resubmit as it was). `switch` names a request feature
    the server rejected (`format`, `logprobs`), for the labeller to turn off."""

    kind: str
    result: dict[str, Any] | None = None
    prior: Prior | None = None
    switch: str | None = None


def judge(line: dict | None, completed: bool, prior: Prior, plan: RequestPlan, fmt: Format, truncated: bool,
          max_retries: int, max_reasks: int, model: str, prompt_id: str) -> Verdict:
    """The verdict for one row from its line (None: no line came back; `completed`: the batch finished)."""
    chat = plan.backend.endpoint == "chat"
    response = (line or {}).get("response") or {}
    error = (line or {}).get("error")
    if line is None:
        return _failed(prior, "no answer in the batch output", max_retries, model, prompt_id, truncated) if completed \
            else Verdict("unfinished")
    if isinstance(error, dict) and error.get("code") in UNFINISHED:
        return Verdict("unfinished")
    status = response.get("status_code")
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    if status != 200 or error:
        message = str(((body.get("error") or {}) if isinstance(body.get("error"), dict) else {}).get("message") or "")
        if status in (400, 422) and fmt != "none" and rejects(message, "format"):
            return Verdict("unfinished", switch="format")
        if status in (400, 422) and rejects(message, "logprobs"):
            return Verdict("unfinished", switch="logprobs")
        if status in (401, 403):
            return Verdict("unfinished")
        code = (error or {}).get("code") if isinstance(error, dict) else None
        detail = f"HTTP {status} in the batch output" if status else f"batch line error ({code or 'unknown'})"
        return _failed(prior, detail, max_retries, model, prompt_id, truncated)
    try:
        answer = read_answer(body, chat=chat)
    except ValueError as exc:
        return _failed(prior, str(exc), max_retries, model, prompt_id, truncated)
    spent = Prior(prior.failures, prior.reasks, prior.input_tokens + (answer.input_tokens or 0),
                  prior.output_tokens + (answer.output_tokens or 0))
    row = schema.empty_result(model=model, prompt_id=prompt_id, truncated=truncated)
    row.update({schema.INPUT_TOKENS: spent.input_tokens, schema.OUTPUT_TOKENS: spent.output_tokens,
                schema.RAW_OUTPUT: answer.text})
    parsed = plan.parse(answer.text, fmt)
    row[schema.MULTI_LABEL] = parsed.multi_label
    if parsed.label is not None:
        probs = label_probs(answer, plan.labels, as_json=plan.parses_json(fmt))
        row.update({schema.LABEL: parsed.label, schema.REASONING: parsed.reasoning, schema.LABEL_PROBS: probs,
                    schema.CONFIDENCE: probs.get(parsed.label) if probs else None})
        return Verdict("final", row)
    if len(prior.reasks) >= max_reasks:
        row[schema.ERROR] = schema.UNPARSEABLE
        return Verdict("final", row)
    return Verdict("again", row, Prior(prior.failures, [*prior.reasks, answer.text], spent.input_tokens, spent.output_tokens))


def _failed(prior: Prior, detail: str, max_retries: int, model: str, prompt_id: str, truncated: bool) -> Verdict:
    row = schema.empty_result(model=model, prompt_id=prompt_id, truncated=truncated)
    row.update({schema.INPUT_TOKENS: prior.input_tokens, schema.OUTPUT_TOKENS: prior.output_tokens})
    if prior.failures >= max_retries:
        row.update({schema.ERROR: schema.API_ERROR, schema.RAW_OUTPUT: f"{detail} (after {max_retries} retries)"})
        return Verdict("final", row)
    return Verdict("again", row, Prior(prior.failures + 1, prior.reasks, prior.input_tokens, prior.output_tokens))
