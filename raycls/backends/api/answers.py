"""Requests and answers of the API backend: what to send for a row, and what came back.

Pure functions over plain JSON bodies, no I/O: the caller actor (`raycls.backends.api.backend`)
does the sending (`raycls.backends.api.http`), retrying and budgeting.

Constraining answers on an API is best effort, in this order: a JSON schema whose
`label` is an enum (OpenAI structured outputs, vLLM), JSON mode, or vLLM's `choice`;
when a server rejects a format with a 400, the next one down is used; plain text and
the tolerant parser (`raycls.prompting.labels`) are the floor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from raycls.backends.api.http import ApiError, ApiStatusError
from raycls.config import OpenAIConfig
from raycls.backends.api.cost import answer_max_tokens
from raycls.prompting.tokens import MESSAGE_OVERHEAD_TOKENS, estimate_tokens
from raycls.prompting.labels import Parsed, json_schema, match_label, normalise, parse_json_answer, probs_from_logprobs
from raycls.prompting.prompts import PromptPlan

Format = Literal["json_schema", "json_object", "choice", "none"]
TOP_LOGPROBS = 5

_FALLBACK: dict[str, Format | None] = {"json_schema": "json_object", "json_object": "none", "choice": "none", "none": None}
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "structured", "guided", "choice")
_LOGPROB_WORDS = ("logprob",)
_TOO_LONG_WORDS = ("context length", "context_length", "maximum context", "too long", "max_model_len", "too many tokens", "reduce the length")


@dataclass(frozen=True)
class Answer:
    """One response, reduced to what the row needs."""

    text: str
    input_tokens: int | None
    output_tokens: int | None
    tokens: list[tuple[str, list[tuple[str, float]]]]
    """Generated tokens, each with its top alternatives (token, logprob), when the server gave them."""


@dataclass(frozen=True)
class RequestPlan:
    """How every request of this job is shaped; computed once per caller actor."""

    backend: OpenAIConfig
    prompt: PromptPlan
    max_tokens: int

    @classmethod
    def build(cls, backend: OpenAIConfig, prompt: PromptPlan) -> "RequestPlan":
        return cls(backend, prompt, answer_max_tokens(backend, prompt))

    @property
    def labels(self) -> list[str]:
        return list(self.prompt.labels)

    def first_format(self) -> Format:
        fmt = self.backend.response_format
        if fmt != "auto":
            return fmt
        return "json_schema" if self.prompt.expects_json else "none"

    def parses_json(self, fmt: Format) -> bool:
        return self.prompt.expects_json or fmt in ("json_schema", "json_object")

    @property
    def path(self) -> str:
        """The endpoint under `base_url`."""
        return "/chat/completions" if self.backend.endpoint == "chat" else "/completions"

    def request(self, text: str, fmt: Format, logprobs: bool, reasks: list[str]) -> dict[str, Any]:
        """The JSON body of the request to `path`: the OpenAI fields, then `backend.extra_body`'s
        and the server-specific constraints (vLLM's `structured_outputs`) at the top level."""
        b = self.backend
        kwargs: dict[str, Any] = {"model": b.model, "max_tokens": self.max_tokens, "temperature": b.temperature}
        body: dict[str, Any] = dict(b.extra_body)
        labels = self.labels
        schema = json_schema(labels, self.prompt.reasoning and self.prompt.expects_json)
        if b.endpoint == "chat":
            kwargs["messages"] = self.messages(text, fmt, reasks)
            if fmt == "json_schema":
                kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}
            elif fmt == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
            if logprobs:
                kwargs.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        else:
            # A base model continues the text: a constrained answer starts with the cue's space.
            prefix = self.prompt.answer_prefix if fmt in ("choice", "json_schema") else ""
            kwargs["prompt"] = self.prompt.render(text) + prefix
            if fmt == "json_schema":
                body["structured_outputs"] = {"json": schema}
            elif fmt == "json_object":
                body["response_format"] = {"type": "json_object"}
            if logprobs:
                kwargs["logprobs"] = TOP_LOGPROBS
            if reasks:
                # No conversation to correct on a completion endpoint: sample differently instead.
                kwargs["temperature"] = max(b.temperature, 0.7)
        if fmt == "choice":
            body["structured_outputs"] = {"choice": labels}
        return {**kwargs, **body}

    def messages(self, text: str, fmt: Format, reasks: list[str]) -> list[dict[str, str]]:
        messages = list(self.prompt.messages(text))
        if fmt in ("json_schema", "json_object") and not self.prompt.expects_json:
            # JSON mode needs the word JSON in the conversation, and says what to put in it.
            messages.insert(0, {"role": "system", "content": f'Reply with a JSON object {{"label": "<one of: {", ".join(self.labels)}>"}}.'})
        for raw in reasks:
            messages.append({"role": "assistant", "content": raw})
            messages.append({"role": "user", "content": self.correction(fmt)})
        return messages

    def correction(self, fmt: Format) -> str:
        allowed = ", ".join(self.labels)
        if self.parses_json(fmt):
            return f'That is not a valid answer. Reply with only a JSON object whose "label" is exactly one of: {allowed}.'
        return f"That is not a valid answer. Reply with exactly one of: {allowed}."

    def estimate_input_tokens(self, text: str, reasks: list[str]) -> int:
        """Input tokens of a request, estimated high (for rate-limit reservations)."""
        extra = sum(estimate_tokens(r) + estimate_tokens(self.correction("none")) + 2 * MESSAGE_OVERHEAD_TOKENS for r in reasks)
        return estimate_tokens(self.prompt.render(text)) + MESSAGE_OVERHEAD_TOKENS + 16 + extra

    def parse(self, raw: str, fmt: Format) -> Parsed:
        if self.parses_json(fmt):
            return parse_json_answer(raw, self.labels)
        return match_label(raw, self.labels)


def fallback(fmt: Format) -> Format | None:
    """The next weaker format after a server rejected `fmt`."""
    return _FALLBACK[fmt]


def rejects(message: str, what: Literal["format", "logprobs", "too_long"]) -> bool:
    """Whether a 400's message blames the response format, logprobs, or the prompt's length."""
    words = {"format": _FORMAT_WORDS, "logprobs": _LOGPROB_WORDS, "too_long": _TOO_LONG_WORDS}[what]
    lowered = message.lower()
    return any(word in lowered for word in words)


class MalformedAnswer(ValueError):
    """The server's response parsed as JSON but is not shaped like a chat or completion answer."""


def read_answer(response: dict[str, Any], chat: bool) -> Answer:
    """Text, usage and per-token alternatives from a chat or completion response body.

    Raises MalformedAnswer (a ValueError, retried like a broken body) for a body of
    another shape: nothing validated it, so a field may be missing or of another type.
    """
    try:
        return _read_answer(response, chat)
    except (AttributeError, TypeError, IndexError, KeyError) as exc:
        raise MalformedAnswer(f"unexpected response shape ({type(exc).__name__}: {str(exc)[:80]})") from None


def _read_answer(response: dict[str, Any], chat: bool) -> Answer:
    choices = response.get("choices") or []
    choice = choices[0] if choices else None
    usage = response.get("usage") or {}
    tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if choice is None:
        return Answer("", tokens_in, tokens_out, [])
    logprobs = choice.get("logprobs") or {}
    if chat:
        text = (choice.get("message") or {}).get("content") or ""
        tokens = [(t["token"], [(a["token"], a["logprob"]) for a in (t.get("top_logprobs") or [])] or [(t["token"], t["logprob"])])
                  for t in logprobs.get("content") or []]
    else:
        text = choice.get("text") or ""
        tokens = []
        listed = logprobs.get("tokens") or []
        tops = logprobs.get("top_logprobs") or [None] * len(listed)
        owns = logprobs.get("token_logprobs") or [None] * len(listed)
        for token, top, own in zip(listed, tops, owns):
            alts = list((top or {}).items()) or ([(token, own)] if own is not None else [])
            tokens.append((token, alts))
    if not isinstance(text, str):
        raise TypeError(f"answer text is {type(text).__name__}")
    return Answer(text, tokens_in, tokens_out, tokens)


_LABEL_VALUE = re.compile(r'"label"\s*:\s*"')


def label_probs(answer: Answer, labels: list[str], as_json: bool) -> dict[str, float] | None:
    """Per-label probabilities from the alternatives at the token where the label starts.

    Alternatives are mapped to labels by prefix (a token `Pos` counts for `positive`); a
    token that could start several labels is shared between them evenly. None when the
    server gave no logprobs or no alternative names a label.
    """
    if not answer.tokens:
        return None
    start = 0
    if as_json:
        found = _LABEL_VALUE.search(answer.text)
        if found is None:
            return None
        start = found.end()
    else:
        start = len(answer.text) - len(answer.text.lstrip())
    offset = 0
    for token, alternatives in answer.tokens:
        end = offset + len(token)
        if end > start:
            skip = max(0, start - offset)
            return _masses_to_probs(alternatives, labels, token[:skip])
        offset = end
    return None


def _masses_to_probs(alternatives: list[tuple[str, float]], labels: list[str], lead: str) -> dict[str, float] | None:
    norms = {label: normalise(label) for label in labels}
    mass = {label: 0.0 for label in labels}
    for alt, logprob in alternatives:
        if logprob is None or not math.isfinite(logprob):
            continue
        if normalise(lead):  # the token began inside the JSON before the value (e.g. `: "pos`)
            if not alt.startswith(lead):
                continue
            alt = alt[len(lead):]
        piece = normalise(alt)
        if not piece:
            continue
        hits = [label for label, norm in norms.items() if norm and (norm.startswith(piece) or piece.startswith(norm))]
        for label in hits:
            mass[label] += math.exp(logprob) / len(hits)
    if not any(mass.values()):
        return None
    return probs_from_logprobs({label: (math.log(m) if m > 0 else None) for label, m in mass.items()})


def error_summary(exc: Exception) -> str:
    """A short, key-free description of a failed request for `raw_output` and logs.

    The status and the server's error code/type. Providers echo (parts of) the API key
    in 401/403 messages, so those messages are never kept; a 400's message is what tells
    the user why every row failed, so it is kept, cut short, with anything shaped like a
    key masked (the caller also replaces the run's own keys).
    """
    if isinstance(exc, ApiStatusError):
        code = exc.code if exc.code and re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", exc.code) else None
        summary = f"HTTP {exc.status_code} {_STATUS_NAMES.get(exc.status_code, 'error')}" + (f" ({code})" if code else "")
        message = _server_message(exc.message) if exc.status_code in (400, 404, 422) else None
        return f"{summary}: {message}" if message else summary
    if isinstance(exc, ApiError):
        return str(exc)
    return type(exc).__name__


_KEY_SHAPED = re.compile(r"(sk|key|token|bearer)[-_ ]?[A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)


_STATUS_NAMES = {400: "bad request", 401: "unauthorized", 403: "forbidden", 404: "not found", 408: "request timeout",
                 409: "conflict", 422: "unprocessable", 429: "rate limited", 500: "server error", 502: "bad gateway",
                 503: "unavailable", 504: "gateway timeout"}


def _server_message(message: str) -> str | None:
    if not message.strip():
        return None
    message = _KEY_SHAPED.sub("<redacted>", " ".join(message.split()))
    return message if len(message) <= 200 else message[:197] + "..."
