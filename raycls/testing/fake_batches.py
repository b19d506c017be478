"""The fake OpenAI server's Batch API: files and batches, mounted on `FakeOpenAI`'s routes.

What batch mode must survive is slow, not fast: a batch takes hours, then completes,
fails, expires or is cancelled, and some of its lines are errors. So batches here move
through `validating → in_progress → finalizing → completed` one step per
`steps_per_state` retrievals (never by wall clock, so tests need no sleeps), or stay
`in_progress` while `hold` is set until `release()`. Faults come on demand, by the
batch's creation ordinal: `fail`, `expire` (with a share of its lines done), per-line
errors and a malformed output line. A batch whose tokens would take the model over
`enqueued_token_limit` fails validation with `token_limit_exceeded`, as OpenAI's do.
Each line is answered by `FakeOpenAI.answer_request`, the synchronous routes' own code,
so a batch job and a synchronous job get the same answers. `counters()` tells tests
what was uploaded, created and enqueued.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from raycls.testing.fake_answers import approx_tokens, prompt_text

if TYPE_CHECKING:
    from raycls.testing.fake_openai import FakeOpenAI

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
ENDPOINTS = {"/v1/chat/completions": True, "/v1/completions": False}


class BatchBehaviour(BaseModel):
    """How the fake Batch API behaves. Ordinals count batches in creation order, from 0."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    steps_per_state: int = Field(1, ge=1)
    """Retrievals a batch spends in each of validating, in_progress and finalizing."""
    hold: bool = False
    """Keep batches in_progress until `release()` (a test's "the provider is still working")."""
    enqueued_token_limit: int | None = Field(None, ge=1)
    """Tokens (prompt estimate + max_tokens) a model may have in active batches; more fails validation."""
    fail: list[int] = []
    """Batches that fail validation (status failed, no output)."""
    expire: dict[int, float] = {}
    """Batches that expire, with the share of their lines answered before the window closed."""
    line_errors_every: int = Field(0, ge=0)
    """In the batches of `faulty_batches`: every Nth line goes to the error file as a 500."""
    malformed_every: int = Field(0, ge=0)
    """In the batches of `faulty_batches`: every Nth output line is written cut in half."""
    faulty_batches: list[int] = [0]
    """Which batches get the per-line faults above (the first by default: a second round is clean)."""
    max_requests: int = Field(50_000, ge=1)
    """Requests per batch file at most (more: the batch fails validation)."""
    max_bytes: int = Field(200_000_000, ge=1)
    """Bytes per uploaded file at most (more: 400 on upload)."""


@dataclass
class BatchCounters:
    """What the fake Batch API saw; `FakeOpenAI.batches.counters()` returns a copy."""

    uploads: int = 0
    bytes_uploaded: int = 0
    batches_created: int = 0
    requests_enqueued: int = 0
    enqueued_tokens: int = 0
    """Tokens in active batches now."""
    max_enqueued_tokens: int = 0
    """The most tokens ever active at once."""
    token_limit_failures: int = 0
    cancels: int = 0
    downloads: int = 0
    retrievals: int = 0
    by_key: dict[str, int] = field(default_factory=dict)
    """Batches created per key."""


@dataclass
class _Batch:
    ordinal: int
    data: dict[str, Any]
    lines: list[dict]
    tokens: int
    polls: int = 0
    fail_code: str | None = None


class FakeBatches:
    """The /v1/files and /v1/batches routes of one `FakeOpenAI`; state lives on its loop."""

    def __init__(self, server: "FakeOpenAI", behaviour: BatchBehaviour):
        self.server, self.behaviour = server, behaviour
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, _Batch] = {}
        self.stats = BatchCounters()

    def mount(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self._upload)
        router.add_get("/v1/files/{id}/content", self._content)
        router.add_get("/v1/files/{id}", self._file)
        router.add_post("/v1/batches", self._create)
        router.add_get("/v1/batches", self._list)
        router.add_get("/v1/batches/{id}", self._retrieve)
        router.add_post("/v1/batches/{id}/cancel", self._cancel)

    # -- test hooks (thread-safe through the server's loop) -------------------------------

    def counters(self) -> BatchCounters:
        return self.server._on_loop(lambda: BatchCounters(**{k: (dict(v) if isinstance(v, dict) else v)
                                                             for k, v in asdict(self.stats).items()}))

    def release(self) -> None:
        """Let held batches finish: from now on they advance on retrieval like the others."""
        def apply() -> None:
            self.behaviour = self.behaviour.model_copy(update={"hold": False})
        self.server._on_loop(apply)

    def statuses(self) -> dict[str, str]:
        return self.server._on_loop(lambda: {bid: b.data["status"] for bid, b in self.batches.items()})

    # -- helpers -----------------------------------------------------------------------------

    def _denied(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        return self.server._auth(request)

    def _new_id(self, prefix: str) -> str:
        self.server._ids += 1
        return f"{prefix}-{self.server._ids:06d}"

    def _store(self, content: bytes, purpose: str, filename: str) -> dict[str, Any]:
        fid = self._new_id("file")
        meta = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        self.files[fid] = {"meta": meta, "content": content}
        return meta

    def _set(self, batch: _Batch, status: str) -> None:
        was = batch.data["status"]
        batch.data["status"] = status
        batch.data[f"{status}_at"] = int(time.time())
        if was in ACTIVE and status not in ACTIVE:
            self.stats.enqueued_tokens -= batch.tokens

    def _advance(self, batch: _Batch) -> None:
        """One retrieval's worth of progress."""
        status = batch.data["status"]
        if status not in ACTIVE:
            return
        batch.polls += 1
        if status == "cancelling":
            self._finish(batch, "cancelled", 0.0)
            return
        if batch.polls < self.behaviour.steps_per_state:
            return
        batch.polls = 0
        b = self.behaviour
        if status == "validating":
            if batch.fail_code or batch.ordinal in b.fail:
                code = batch.fail_code or "invalid_request"
                message = ("Enqueued token limit reached for fake-model. Please try again once some in_progress "
                           "batches have been completed." if code == "token_limit_exceeded" else "The batch failed validation.")
                batch.data["errors"] = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}
                self._set(batch, "failed")
            else:
                self._set(batch, "in_progress")
        elif status == "in_progress" and not b.hold:
            if batch.ordinal in b.expire:
                self._finish(batch, "expired", b.expire[batch.ordinal])
            else:
                self._set(batch, "finalizing")
        elif status == "finalizing":
            self._finish(batch, "completed", 1.0)

    def _finish(self, batch: _Batch, status: str, share: float) -> None:
        """Answer the first `share` of the lines; the rest get `batch_<status>` errors (as OpenAI does)."""
        b, outputs, errors = self.behaviour, [], []
        faulty = batch.ordinal in b.faulty_batches
        done = int(len(batch.lines) * share)
        chat = ENDPOINTS[batch.data["endpoint"]]
        for i, line in enumerate(batch.lines):
            cid = line.get("custom_id")
            rid = self._new_id("batch_req")
            if i >= done:
                errors.append({"id": rid, "custom_id": cid, "response": None, "error": {
                    "code": f"batch_{status}", "message": f"This request could not be executed before the batch was {status}."}})
                continue
            if faulty and b.line_errors_every and i % b.line_errors_every == 0:
                errors.append({"id": rid, "custom_id": cid, "error": None, "response": {
                    "status_code": 500, "request_id": rid,
                    "body": {"error": {"message": "The server had an error.", "type": "server_error", "code": None}}}})
                continue
            problem, body, _, _ = self.server.answer_request(line.get("body"), chat)
            response = ({"status_code": 400, "request_id": rid, "body": {"error": problem}} if problem
                        else {"status_code": 200, "request_id": rid, "body": body})
            text = json.dumps({"id": rid, "custom_id": cid, "response": response, "error": None}, ensure_ascii=False)
            if faulty and b.malformed_every and i % b.malformed_every == 1:
                text = text[: len(text) // 2]
            (errors if problem else outputs).append(text)
        encode = lambda rows: "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()  # noqa: E731
        if outputs:
            batch.data["output_file_id"] = self._store(encode(outputs), "batch_output", "output.jsonl")["id"]
        if errors:
            batch.data["error_file_id"] = self._store(encode(errors), "batch_output", "errors.jsonl")["id"]
        batch.data["request_counts"] = {"total": len(batch.lines), "completed": len(outputs),
                                        "failed": len(batch.lines) - len(outputs)}
        self._set(batch, status)

    # -- routes ------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        key, denied = self._denied(request)
        if denied:
            return denied
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch" or not hasattr(upload, "file"):
            return _bad("Expected multipart fields 'file' and purpose=batch.")
        content = upload.file.read()
        if len(content) > self.behaviour.max_bytes:
            return _bad(f"File is {len(content)} bytes, over the limit of {self.behaviour.max_bytes}.")
        self.stats.uploads += 1
        self.stats.bytes_uploaded += len(content)
        return web.json_response(self._store(content, "batch", upload.filename or "batch.jsonl"))

    async def _file(self, request: web.Request) -> web.Response:
        _, denied = self._denied(request)
        if denied:
            return denied
        found = self.files.get(request.match_info["id"])
        return web.json_response(found["meta"]) if found else _missing("file")

    async def _content(self, request: web.Request) -> web.Response:
        _, denied = self._denied(request)
        if denied:
            return denied
        found = self.files.get(request.match_info["id"])
        if not found:
            return _missing("file")
        self.stats.downloads += 1
        return web.Response(body=found["content"], content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.Response:
        key, denied = self._denied(request)
        if denied:
            return denied
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _bad("Expected a JSON body.")
        found = self.files.get(body.get("input_file_id") or "")
        endpoint = body.get("endpoint")
        if not found:
            return _missing("input file")
        if endpoint not in ENDPOINTS or not isinstance(body.get("completion_window"), str):
            return _bad("endpoint must be /v1/chat/completions or /v1/completions, with a completion_window.")
        lines, tokens, bad = [], 0, None
        for n, raw in enumerate(found["content"].decode("utf-8", "replace").splitlines()):
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                bad = f"line {n + 1} is not JSON"
                break
            if line.get("url") != endpoint or line.get("method") != "POST" or not line.get("custom_id"):
                bad = f"line {n + 1} needs custom_id, method POST and url {endpoint}"
                break
            prompt = prompt_text(line.get("body") or {}, ENDPOINTS[endpoint]) or ""
            tokens += approx_tokens(prompt) + int((line.get("body") or {}).get("max_tokens") or 16)
            lines.append(line)
        if bad is None and len({line["custom_id"] for line in lines}) != len(lines):
            bad = "custom_id values must be unique within a batch"
        if bad is None and len(lines) > self.behaviour.max_requests:
            bad = f"{len(lines)} requests, over the limit of {self.behaviour.max_requests}"
        bid = self._new_id("batch")
        data = {"id": bid, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": found["meta"]["id"],
                "completion_window": body["completion_window"], "status": "validating", "output_file_id": None,
                "error_file_id": None, "created_at": int(time.time()), "metadata": body.get("metadata"),
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        batch = _Batch(self.stats.batches_created, data, lines, tokens)
        limit = self.behaviour.enqueued_token_limit
        if bad:
            batch.fail_code = "invalid_request"
        elif limit is not None and self.stats.enqueued_tokens + tokens > limit:
            batch.fail_code = "token_limit_exceeded"
            self.stats.token_limit_failures += 1
        else:
            self.stats.enqueued_tokens += tokens
            self.stats.requests_enqueued += len(lines)
            self.stats.max_enqueued_tokens = max(self.stats.max_enqueued_tokens, self.stats.enqueued_tokens)
        if batch.fail_code:
            batch.tokens = 0
        self.stats.batches_created += 1
        self.stats.by_key[key] = self.stats.by_key.get(key, 0) + 1
        self.batches[bid] = batch
        return web.json_response(data)

    async def _retrieve(self, request: web.Request) -> web.Response:
        _, denied = self._denied(request)
        if denied:
            return denied
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _missing("batch")
        self.stats.retrievals += 1
        self._advance(batch)
        return web.json_response(batch.data)

    async def _list(self, request: web.Request) -> web.Response:
        _, denied = self._denied(request)
        if denied:
            return denied
        data = [b.data for b in sorted(self.batches.values(), key=lambda b: -b.ordinal)]
        after = request.query.get("after")
        if after:
            ids = [d["id"] for d in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        limit = int(request.query.get("limit", "20"))
        return web.json_response({"object": "list", "data": data[:limit], "has_more": len(data) > limit,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[:limit][-1]["id"] if data else None})

    async def _cancel(self, request: web.Request) -> web.Response:
        _, denied = self._denied(request)
        if denied:
            return denied
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _missing("batch")
        if batch.data["status"] in ACTIVE:
            self.stats.cancels += 1
            batch.data["status"] = "cancelling"
            batch.data["cancelling_at"] = int(time.time())
        return web.json_response(batch.data)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}, status=400)


def _missing(what: str) -> web.Response:
    return web.json_response({"error": {"message": f"No such {what}.", "type": "invalid_request_error", "param": None,
                                        "code": "not_found"}}, status=404)
