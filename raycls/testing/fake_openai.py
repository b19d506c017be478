"""A fault-injection OpenAI-compatible server on 127.0.0.1, for tests and benchmarks.

The API backend must survive what real providers do: per-key RPM/TPM limits answered
with 429 and `Retry-After`, revoked keys, 500s, hung connections, broken or off-label
answers. Mocking the client would test nothing of that, so this is a real HTTP server
(aiohttp, one event loop in a background thread) that the unmodified `openai` client
talks to. It also *counts*: per key, every admitted request and its tokens over a sliding
window, so a test can assert that no key ever went over its limit in any window.

Python: `with FakeOpenAI(FakeOpenAIConfig(keys=["k1"], rpm=60)) as srv: srv.base_url`.
CLI: `python -m raycls.testing.fake_openai --port 8199 --latency-ms 200 --rpm 600`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from raycls.testing.fake_batches import BatchBehaviour, FakeBatches
from raycls.testing.fake_answers import Oracle, approx_tokens, compose, prompt_text, response_body

MalformedKind = Literal["truncated", "prose", "whitespace", "body"]
MALFORMED_KINDS: list[MalformedKind] = ["truncated", "prose", "whitespace", "body"]
Rate = Field(0.0, ge=0.0, le=1.0)
_FAULT_COUNTERS = {"error": "server_errors", "timeout": "timeouts", "offlabel": "offlabel"}


class FakeOpenAIConfig(BaseModel):
    """How the fake provider behaves. Every rate is a probability per admitted request."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, use_attribute_docstrings=True)

    keys: list[str] = ["sk-fake"]
    """API keys accepted in `Authorization: Bearer KEY`; any other key gets 401."""
    revoked: list[str] = []
    """Keys that answer `revoked_status` (as a key revoked at the provider does). See also `revoke()`."""
    revoked_status: Literal[401, 403] = 401
    """What a revoked key answers: providers differ (OpenAI 401, some gateways 403)."""
    rpm: int | None = Field(None, ge=1)
    """Requests per key per window; None = unlimited."""
    tpm: int | None = Field(None, ge=1)
    """Tokens (`usage.total_tokens`) per key per window; None = unlimited."""
    window_s: float = Field(60.0, gt=0)
    """Length of the sliding window, seconds. Tests shorten it, with proportionally small limits."""
    enforce_limits: bool = True
    """False: admit everything but still count, to check a client's own pacing."""
    latency_ms: float = Field(0.0, ge=0)
    """Fixed delay before an admitted request is answered."""
    jitter_ms: float = Field(0.0, ge=0)
    """Uniform extra delay in [0, jitter_ms] on top of `latency_ms`."""
    error_rate: float = Rate
    """Share of admitted requests answered 500."""
    timeout_rate: float = Rate
    """Share held for `hang_s` before answering, longer than any sane client timeout."""
    hang_s: float = Field(60.0, gt=0)
    """How long a "timeout" request is held, seconds; then it is answered normally if the client waited."""
    malformed_rate: float = Rate
    """Share answered with a broken answer, of a kind drawn from `malformed_kinds`."""
    malformed_kinds: list[MalformedKind] = MALFORMED_KINDS
    """truncated: the answer cut in half (finish_reason "length"); prose: text naming no label;
    whitespace: blank filler (as small models do under JSON schemas); body: HTTP 200 with a cut JSON body."""
    offlabel_rate: float = Rate
    """Share answered with a label outside the set, or with two labels."""
    labels: list[str] | None = None
    """Label set used when the request does not carry one (choice list or JSON-schema enum)."""
    oracle: Oracle = None
    """Gold answers: {text substring: label} (the match ending latest in the prompt wins, so few-shot
    examples do not shadow the row) or a callable(prompt) -> label. Else a hash of the prompt picks."""
    models: list[str] = ["fake-model"]
    """Listed by GET /v1/models; requests may name any model."""
    reject_features: list[Literal["json_schema", "json_object", "logprobs"]] = []
    """Request features answered 400, as servers without them do: clients must fall back."""
    echo_keys: bool = False
    """Repeat the offending key in 401/403 messages, as some providers do: clients must not log them."""
    seed: int = 0
    """Seeds the fault draws and jitter; the same request sequence then meets the same faults."""
    batch: BatchBehaviour = BatchBehaviour()
    """How the Batch API (/v1/files, /v1/batches: `fake_batches`) behaves."""

    @model_validator(mode="after")
    def _rates_fit(self) -> FakeOpenAIConfig:
        total = self.error_rate + self.timeout_rate + self.malformed_rate + self.offlabel_rate
        if total > 1.0:
            raise ValueError(f"error/timeout/malformed/offlabel rates must sum to <= 1, got {total}")
        if self.malformed_rate and not self.malformed_kinds:
            raise ValueError("malformed_rate > 0 needs at least one malformed_kinds entry")
        return self


@dataclass
class KeyStats:
    """What one key saw. `max_*_in_window` is over every window of `window_s` ending at an admission."""

    accepted: int = 0
    rate_limited: int = 0
    unauthorized: int = 0
    server_errors: int = 0
    timeouts: int = 0
    malformed: int = 0
    offlabel: int = 0
    tokens: int = 0
    max_requests_in_window: int = 0
    max_tokens_in_window: int = 0


@dataclass
class FakeStats:
    """Snapshot of the server's counters; `GET /_stats` returns it as JSON."""

    window_s: float
    rpm: int | None
    tpm: int | None
    keys: dict[str, KeyStats] = field(default_factory=dict)
    unknown_key: int = 0
    """401s for keys the server never knew."""
    in_flight: int = 0
    """Admitted requests being answered now (waiting out their latency or hanging)."""
    max_in_flight: int = 0
    """The most requests answered at once: above 1, the server overlapped their latencies."""


class _Window:
    """A key's admitted (time, tokens) inside the sliding window, pruned on use: bounded memory."""

    __slots__ = ("events", "tokens")

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def prune(self, now: float, window: float) -> None:
        events, cutoff = self.events, now - window
        while events and events[0][0] <= cutoff:
            self.tokens -= events.popleft()[1]

    def wait_for_tokens(self, need: int, now: float, window: float) -> float:
        """Seconds until `need` tokens have left the window."""
        freed = 0
        for ts, tokens in self.events:
            freed += tokens
            if freed >= need:
                return ts + window - now
        return window


def _duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: "250ms", "1.5s", "1m3s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, sec = divmod(seconds, 60)
    return f"{int(minutes)}m{sec:.3g}s" if minutes else f"{sec:.3g}s"


def _error(status: int, message: str, type_: str, code: str | None, headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class FakeOpenAI:
    """The server. `start()` binds 127.0.0.1 (port 0 = any free one) and returns the base URL."""

    def __init__(self, config: FakeOpenAIConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        """`clock` (seconds) times the rate-limit windows: a test passes a fake one and moves
        it on, rather than sleeping until a window has passed."""
        self.config = config or FakeOpenAIConfig()
        self.clock = clock
        self.host, self.port = host, port
        self.base_url = ""
        self._rng = random.Random(self.config.seed)
        self._revoked = set(self.config.revoked)
        self._known = set(self.config.keys) | self._revoked
        self._reset()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0
        self.batches = FakeBatches(self, self.config.batch)
        """The Batch API's state and test hooks (`counters()`, `release()`)."""

    # -- lifecycle and the thread-safe Python API ------------------------------------------

    def start(self) -> str:
        sock = socket.create_server((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(sock, ready), name="fake-openai", daemon=True)
        self._thread.start()
        ready.wait()
        self.base_url = f"http://{self.host}:{self.port}/v1"
        return self.base_url

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop = self._thread = None

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> FakeStats:
        return self._on_loop(self._snapshot)

    def reset_stats(self) -> None:
        """Forget counters and windows, e.g. between benchmark phases sharing one server."""
        self._on_loop(self._reset)

    def revoke(self, key: str) -> None:
        """Revoke a key mid-run, as a provider does; it answers `revoked_status` from now on."""
        def apply() -> None:
            self._revoked.add(key)
            self._known.add(key)
            self._windows.setdefault(key, _Window())
            self._key_stats.setdefault(key, KeyStats())

        self._on_loop(apply)

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop, so its state is only ever touched by one thread."""
        if self._loop is None:
            return fn()

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        # Bodies up to the Batch API's file limit (aiohttp's default cap is 1 MiB: a batch file
        # of a few thousand requests would be refused with 413 before the fake could judge it).
        app = web.Application(client_max_size=self.config.batch.max_bytes + 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self.batches.mount(app.router)
        app.router.add_get("/_stats", self._stats_route)
        app.router.add_post("/_reset", self._reset_route)
        # Cancel handlers of clients that gave up (hung requests), and drop them fast at stop.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.SockSite(runner, sock).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    # -- state -----------------------------------------------------------------------------

    def _reset(self) -> None:
        self._windows = {key: _Window() for key in self._known}
        self._key_stats = {key: KeyStats() for key in self._known}
        self._unknown = 0
        self._in_flight = self._max_in_flight = 0

    def _snapshot(self) -> FakeStats:
        keys = {k: KeyStats(**asdict(v)) for k, v in self._key_stats.items()}
        cfg = self.config
        return FakeStats(cfg.window_s, cfg.rpm, cfg.tpm, keys, self._unknown, self._in_flight, self._max_in_flight)

    def _auth(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        header = request.headers.get("Authorization", "")
        key = header[7:] if header.startswith("Bearer ") else ""
        echo = f": {key}" if self.config.echo_keys else ""  # off by default: tests search all output for secrets
        if key in self._revoked:
            self._key_stats[key].unauthorized += 1
            status = self.config.revoked_status
            return None, _error(status, f"This API key has been revoked{echo}.", "invalid_request_error", "invalid_api_key")
        if key not in self._known:
            self._unknown += 1
            return None, _error(401, f"Incorrect API key provided{echo}.", "invalid_request_error", "invalid_api_key")
        return key, None

    def _admit(self, key: str, tokens: int) -> tuple[dict[str, str], web.Response | None]:
        """Check and record one request against the key's window; returns x-ratelimit headers."""
        cfg, now = self.config, self.clock()
        win, stats = self._windows[key], self._key_stats[key]
        win.prune(now, cfg.window_s)
        wait, kind = 0.0, "requests"
        if cfg.rpm and len(win.events) >= cfg.rpm:
            wait = win.events[0][0] + cfg.window_s - now
        elif cfg.tpm and win.tokens + tokens > cfg.tpm:
            wait, kind = win.wait_for_tokens(win.tokens + tokens - cfg.tpm, now, cfg.window_s), "tokens"
        if wait > 0 and cfg.enforce_limits:
            stats.rate_limited += 1
            wait = max(wait, 0.001)
            headers = self._limit_headers(win, now)
            headers.update({"retry-after": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))})
            message = f"Rate limit reached for {kind} per {cfg.window_s:g}s. Please try again in {wait:.3f}s."
            return headers, _error(429, message, kind, "rate_limit_exceeded", headers)
        win.events.append((now, tokens))
        win.tokens += tokens
        stats.accepted += 1
        stats.tokens += tokens
        stats.max_requests_in_window = max(stats.max_requests_in_window, len(win.events))
        stats.max_tokens_in_window = max(stats.max_tokens_in_window, win.tokens)
        return self._limit_headers(win, now), None

    def _limit_headers(self, win: _Window, now: float) -> dict[str, str]:
        """x-ratelimit-*; reset-* is the time until the oldest admission leaves the window."""
        cfg, headers = self.config, {}
        reset = _duration(win.events[0][0] + cfg.window_s - now) if win.events else "0ms"
        if cfg.rpm:
            headers["x-ratelimit-limit-requests"] = str(cfg.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, cfg.rpm - len(win.events)))
            headers["x-ratelimit-reset-requests"] = reset
        if cfg.tpm:
            headers["x-ratelimit-limit-tokens"] = str(cfg.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, cfg.tpm - win.tokens))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers

    # -- the completion routes ---------------------------------------------------------------

    def _refused_feature(self, body: dict) -> str | None:
        """The first feature of the request that `reject_features` says this server lacks."""
        refuse = self.config.reject_features
        fmt = body.get("response_format")
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind in refuse:
            return f"response_format {kind}"
        structured = body.get("structured_outputs")
        if "json_schema" in refuse and isinstance(structured, dict) and "json" in structured:
            return "structured_outputs json"
        if "logprobs" in refuse and body.get("logprobs") not in (None, False):
            return "logprobs"
        return None

    def _draw_fault(self) -> str | None:
        """One seeded draw per request: None, "error", "timeout", "offlabel" or a malformed kind."""
        cfg, u = self.config, self._rng.random()
        for name, rate in (("error", cfg.error_rate), ("timeout", cfg.timeout_rate),
                           ("malformed", cfg.malformed_rate), ("offlabel", cfg.offlabel_rate)):
            if u < rate:
                return self._rng.choice(cfg.malformed_kinds) if name == "malformed" else name
            u -= rate
        return None

    def answer_request(self, body: Any, chat: bool) -> tuple[dict | None, dict | None, str | None, int]:
        """One request answered without HTTP or limits: (error object, response body, fault, tokens).

        Shared by the completion routes and the Batch API (`fake_batches`), so a batch line
        gets exactly the answer the synchronous route gives the same body."""
        def bad(message: str) -> tuple[dict, None, None, int]:
            return {"message": message, "type": "invalid_request_error", "param": None, "code": None}, None, None, 0

        if not isinstance(body, dict) or body.get("n", 1) != 1 or body.get("stream"):
            return bad("Expected a JSON object with n=1 and no streaming.")
        refused = self._refused_feature(body)
        if refused:
            return bad(f"{refused} is not supported by this model.")
        prompt = prompt_text(body, chat)
        if prompt is None:
            return bad("prompt must be one string.")
        cfg, fault = self.config, self._draw_fault()
        answer = compose(body, prompt, fault, cfg.labels, cfg.oracle, self._rng)
        if answer is None:
            return bad("Fake server: no label set; constrain the request or set FakeOpenAIConfig.labels.")
        prompt_tokens, completion_tokens = approx_tokens(prompt), approx_tokens(answer.text)
        self._ids += 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return None, response_body(body, chat, prompt, answer, usage, self._ids), fault, usage["total_tokens"]

    async def _serve_completion(self, request: web.Request, chat: bool) -> web.Response:
        key, denied = self._auth(request)
        if denied:
            return denied
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        problem, response, fault, tokens = self.answer_request(body, chat)
        if problem is not None:
            return web.json_response({"error": problem}, status=400)
        headers, refused = self._admit(key, tokens)
        if refused:
            return refused
        if fault:
            stats = self._key_stats[key]
            counter = _FAULT_COUNTERS.get(fault, "malformed")
            setattr(stats, counter, getattr(stats, counter) + 1)
        cfg = self.config
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:  # a client that gives up cancels the handler: in_flight counts it out then
            delay = cfg.latency_ms + (self._rng.uniform(0, cfg.jitter_ms) if cfg.jitter_ms else 0.0)
            if delay:
                await asyncio.sleep(delay / 1000)
            if fault == "error":
                return _error(500, "The server had an error while processing your request.", "server_error", None, headers)
            if fault == "timeout":
                await asyncio.sleep(cfg.hang_s)
        finally:
            self._in_flight -= 1
        text = json.dumps(response, ensure_ascii=False)
        if fault == "body":
            text = text[: len(text) // 2]
        return web.Response(text=text, content_type="application/json", headers=headers)

    async def _chat(self, request: web.Request) -> web.Response:
        return await self._serve_completion(request, chat=True)

    async def _completions(self, request: web.Request) -> web.Response:
        return await self._serve_completion(request, chat=False)

    async def _models(self, request: web.Request) -> web.Response:
        _, denied = self._auth(request)
        if denied:
            return denied
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "raycls-fake"} for m in self.config.models]
        return web.json_response({"object": "list", "data": data})

    async def _stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self._snapshot()))

    async def _reset_route(self, request: web.Request) -> web.Response:
        self._reset()
        return web.json_response({"ok": True})


_CLI_SCALARS = {"rpm": int, "tpm": int, "window_s": float, "latency_ms": float, "jitter_ms": float, "error_rate": float,
                "timeout_rate": float, "hang_s": float, "malformed_rate": float, "offlabel_rate": float,
                "revoked_status": int, "seed": int}
_CLI_LISTS = {"keys": "accepted keys", "revoked": "revoked keys", "labels": "label set for unconstrained requests",
              "malformed_kinds": "of " + ", ".join(MALFORMED_KINDS)}


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted; prints the base URL first, so `--port 0` callers can read it."""
    fields = FakeOpenAIConfig.model_fields
    p = argparse.ArgumentParser(prog="python -m raycls.testing.fake_openai", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8199)
    for name, kind in _CLI_SCALARS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=fields[name].default,
                       help=fields[name].description)
    for name, what in _CLI_LISTS.items():
        default = fields[name].default
        p.add_argument("--" + name.replace("_", "-"), default=",".join(default or []), help=f"comma-separated {what}")
    p.add_argument("--oracle-jsonl", default="", help="JSONL with text and label fields: answer the gold label")
    p.add_argument("--no-enforce", action="store_true", help="count but never answer 429")
    args = p.parse_args(argv)
    options = {name: getattr(args, name) for name in _CLI_SCALARS}
    options.update({name: [x for x in getattr(args, name).split(",") if x] for name in _CLI_LISTS})
    if args.oracle_jsonl:
        with open(args.oracle_jsonl, encoding="utf-8") as f:
            options["oracle"] = {row["text"]: str(row["label"]) for row in map(json.loads, f) if row.get("text")}
        if not options["labels"]:  # the oracle's gold labels are the label set, in first-seen order
            options["labels"] = list(dict.fromkeys(options["oracle"].values()))
    config = FakeOpenAIConfig(**options | {"labels": options["labels"] or None}, enforce_limits=not args.no_enforce)
    server = FakeOpenAI(config, host=args.host, port=args.port)
    print(server.start(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
