"""What the fake OpenAI server says: plausible classification answers, logprobs and bodies.

Kept apart from the transport (`fake_openai`) because this half is about content: which
label to answer (a gold oracle, else a stable hash of the prompt, so runs repeat), in
which form the request asked for (bare label, JSON with an optional `reasoning`), how it
goes wrong on purpose (off-label, truncated, blank), and logprobs whose top alternatives
are the other labels, so a client can compute per-label probabilities and confidence.
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Union

Oracle = Union[dict[str, str], Callable[[str], Union[str, None]], None]
"""{text substring: gold label}, or a callable(prompt) -> label or None."""

CONTENT_FAULTS = ("offlabel", "truncated", "prose", "whitespace")


def approx_tokens(text: str) -> int:
    """The server's token count: ceil(chars / 4), at least 1. Clients may estimate the same way."""
    return max(1, math.ceil(len(text) / 4))


def dig(obj: Any, *path: str) -> Any:
    """obj[p0][p1]... or None: request bodies are untrusted and often partial."""
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def prompt_text(body: dict, chat: bool) -> str | None:
    """The text the model would read: chat message contents joined, or the one completion prompt."""
    if chat:
        texts = []
        for message in body.get("messages") or []:
            content = dig(message, "content")
            if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
                content = " ".join(str(dig(part, "text") or "") for part in content)
            texts.append(content if isinstance(content, str) else "")
        return "\n".join(texts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None


@dataclass
class Answer:
    """Generated content as coarse tokens; `label_at` indexes the token that is the label."""

    pieces: list[str]
    label_at: int | None = None
    alternatives: list[str] = field(default_factory=list)
    """The other labels, as written in the content: the label token's top_logprobs rivals."""
    confidence: float = 0.99
    finish_reason: str = "stop"

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def pick_label(prompt: str, labels: list[str], oracle: Oracle) -> tuple[str, float]:
    """The label to answer and a confidence in [0.5, 0.99], both stable for a given prompt.

    A dict oracle takes the substring that ends latest in the prompt (the longest on a tie),
    because the row's text comes after any few-shot examples, which hold other rows' texts.
    """
    h = zlib.crc32(prompt.encode())
    confidence = 0.5 + 0.49 * (h >> 16) / 0xFFFF
    if callable(oracle):
        gold = oracle(prompt)
    elif oracle:
        hits = [(prompt.rfind(text) + len(text), len(text), label) for text, label in oracle.items()
                if text and text in prompt]
        gold = max(hits)[2] if hits else None
    else:
        gold = None
    return (gold if gold is not None else labels[h % len(labels)]), confidence


def compose(
    body: dict, prompt: str, fault: str | None, labels: list[str] | None, oracle: Oracle, rng: random.Random
) -> Answer | None:
    """The answer for this request and fault, or None when no label set is known.

    Labels come from the request's constraint (vLLM `structured_outputs.choice` or
    `guided_choice`, a JSON schema's `label` enum), else from `labels`. A JSON response
    format (or a vLLM JSON schema) makes the answer `{"label": ...}`, with a `reasoning`
    first when the schema or the prompt asks for one.
    """
    choice = dig(body, "structured_outputs", "choice") or body.get("guided_choice")
    schema = dig(body, "response_format", "json_schema", "schema") or dig(body, "structured_outputs", "json")
    if isinstance(schema, str):  # vLLM also takes the schema as a JSON string
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            schema = {}
    labels = choice or dig(schema, "properties", "label", "enum") or labels
    if not isinstance(labels, list) or not labels:
        return None
    labels = [str(x) for x in labels]
    as_json = schema is not None or dig(body, "response_format", "type") in ("json_object", "json_schema")
    label, confidence = pick_label(prompt, labels, oracle)
    if fault == "offlabel":
        others = [x for x in labels if x != label]
        named: Any = [label, others[0]] if others and rng.random() < 0.5 else "Other"
        if named == "Other" and named in labels:
            named = "None of these"
        if as_json:
            return Answer([json.dumps({"label": named}, ensure_ascii=False)])
        return Answer([named if isinstance(named, str) else ", ".join(named)])
    if fault in ("truncated", "prose", "whitespace"):
        normal = json.dumps({"label": label}, ensure_ascii=False) if as_json else label
        text = {
            "truncated": normal[: max(1, len(normal) // 2)],
            "prose": "Sure! Let me think about which category fits best.",
            "whitespace": " \n" * 32,
        }[fault]
        return Answer([text], finish_reason="stop" if fault == "prose" else "length")
    alternatives = [x for x in labels if x != label]
    if not as_json:
        return Answer([label], 0, alternatives, confidence)
    head = '{"label": "'
    if dig(schema, "properties", "reasoning") is not None or '"reasoning"' in prompt:
        why = json.dumps(f"The text reads most like {label}.", ensure_ascii=False)
        head = '{"reasoning": ' + why + ', "label": "'
    return Answer([head, _in_json(label), '"}'], 1, [_in_json(x) for x in alternatives], confidence)


def _in_json(text: str) -> str:
    """`text` as it appears inside a JSON string literal (quotes and backslashes escaped)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def token_logprobs(answer: Answer, top: int) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(token, logprob, top alternatives) per token; the label token leaves 1 - confidence to rivals."""
    out = []
    for i, piece in enumerate(answer.pieces):
        if i == answer.label_at:
            logprob = math.log(answer.confidence)
            rival = math.log((1 - answer.confidence) * 0.9 / max(1, len(answer.alternatives)))
            alts = [(piece, logprob)] + [(a, rival) for a in answer.alternatives]
        else:
            logprob, alts = -0.001, [(piece, -0.001)]
        out.append((piece, logprob, alts[:top]))
    return out


def response_body(body: dict, chat: bool, prompt: str, answer: Answer, usage: dict, response_id: int) -> dict:
    """A chat.completion or text_completion object, with logprobs when the request asked."""
    result: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{response_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or "fake-model",
        "usage": usage,
    }
    want = body.get("logprobs")
    logprobs: dict | None = None
    if chat:
        if want:
            rows = token_logprobs(answer, int(body.get("top_logprobs") or 0))
            content = [_token(t, lp) | {"top_logprobs": [_token(a, alp) for a, alp in alts]} for t, lp, alts in rows]
            logprobs = {"content": content, "refusal": None}
        message = {"role": "assistant", "content": answer.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": answer.finish_reason}
    else:
        if isinstance(want, int) and not isinstance(want, bool):
            rows = token_logprobs(answer, want)
            offsets = [len(prompt) + len("".join(answer.pieces[:i])) for i in range(len(rows))]
            logprobs = {
                "tokens": [t for t, _, _ in rows],
                "token_logprobs": [lp for _, lp, _ in rows],
                "top_logprobs": [dict(alts) for _, _, alts in rows],
                "text_offset": offsets,
            }
        choice = {"index": 0, "text": answer.text, "logprobs": logprobs, "finish_reason": answer.finish_reason}
    result["choices"] = [choice]
    return result
