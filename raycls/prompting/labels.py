"""The label set: constrained-output specs, parsing model output, probabilities from logprobs.

Backends constrain what they can (vLLM makes an out-of-set label impossible; APIs take a
JSON schema where the server supports one) and hand the raw text here. Parsing is
tolerant in a fixed order: exact → normalised (case, whitespace, punctuation) →
unique prefix → unique substring. An answer that names several labels is flagged as
multi-label and not guessed at.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass

_PUNCT = re.compile(r"[\s\"'`.,;:!?()\[\]{}<>*_#\-/\\|。，；：！？“”‘’（）【】、]+")


def normalise(text: str) -> str:
    """Lower case, NFKC, punctuation and whitespace removed: `" Sci/Tech." -> "scitech"`."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).casefold())


def choice_spec(labels: list[str]) -> dict:
    """vLLM structured outputs that allow exactly one label and nothing else."""
    return {"choice": list(labels)}


def json_schema(labels: list[str], reasoning: bool) -> dict:
    """A JSON schema whose `label` is an enum of the labels; `reasoning` comes first when asked."""
    properties: dict[str, dict] = {}
    if reasoning:
        properties["reasoning"] = {"type": "string"}
    properties["label"] = {"type": "string", "enum": list(labels)}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Parsed:
    """What a raw answer says: one label, or none; and whether it named several."""

    label: str | None
    reasoning: str | None = None
    multi_label: bool = False


def match_label(answer: str, labels: list[str]) -> Parsed:
    """Map free text to one label, tolerant of case, spacing, punctuation and prefixes."""
    stripped = answer.strip()
    if stripped in labels:
        return Parsed(stripped)
    key = normalise(stripped)
    if not key:
        return Parsed(None)
    by_norm = {normalise(label): label for label in labels}
    if key in by_norm:
        return Parsed(by_norm[key])
    named = [label for norm, label in by_norm.items() if norm and norm in key]
    # "Sci/Tech" names "Tech" too: keep only the longest of labels nested in each other.
    named = [a for a in named if not any(a != b and normalise(a) in normalise(b) for b in named)]
    if len(named) > 1:
        return Parsed(None, multi_label=True)
    if len(named) == 1:
        return Parsed(named[0])
    truncated = [label for norm, label in by_norm.items() if norm.startswith(key)]
    if len(truncated) == 1:
        return Parsed(truncated[0])
    return Parsed(None)


def parse_json_answer(raw: str, labels: list[str]) -> Parsed:
    """Parse `{"reasoning": ..., "label": ...}`, also inside code fences or surrounding text."""
    obj = _first_json_object(raw)
    if obj is None:
        return match_label(raw, labels) if raw.strip() else Parsed(None)
    reasoning = obj.get("reasoning")
    reasoning = str(reasoning) if reasoning is not None else None
    value = obj.get("label")
    if isinstance(value, list):
        found = {match_label(str(v), labels).label for v in value} - {None}
        if len(found) > 1:
            return Parsed(None, reasoning, multi_label=True)
        value = next(iter(found), None)
    if value is None:
        return Parsed(None, reasoning)
    parsed = match_label(str(value), labels)
    return Parsed(parsed.label, reasoning, parsed.multi_label)


def _first_json_object(raw: str) -> dict | None:
    start = raw.find("{")
    decoder = json.JSONDecoder()
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(raw, start)
        except json.JSONDecodeError:
            start = raw.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return obj
        start = raw.find("{", start + 1)
    return None


def parse_answer(raw: str, labels: list[str], expects_json: bool) -> Parsed:
    """Parse a raw answer for a prompt that asks for a JSON object or for the bare label."""
    return parse_json_answer(raw, labels) if expects_json else match_label(raw, labels)


def probs_from_logprobs(label_logprobs: dict[str, float | None]) -> dict[str, float]:
    """Normalise per-label log-probabilities into probabilities over the label set.

    A label with no logprob (not among the tokens the engine reported) gets 0.
    """
    finite = {k: v for k, v in label_logprobs.items() if v is not None and math.isfinite(v)}
    if not finite:
        return {k: 0.0 for k in label_logprobs}
    top = max(finite.values())
    weights = {k: math.exp(v - top) for k, v in finite.items()}
    total = sum(weights.values())
    return {k: weights.get(k, 0.0) / total for k in label_logprobs}


def first_tokens(labels: list[str], encode) -> dict[str, int]:
    """The first token id of each label as the model writes it, for reading its logprob.

    Labels that share a first token share its probability; `label_logprobs_from_tokens`
    splits it between them evenly so the figures stay a distribution.
    """
    return {label: encode(label)[0] for label in labels}


def label_logprobs_from_tokens(
    token_logprobs: dict[int, float], label_tokens: dict[str, int]
) -> dict[str, float | None]:
    """Per-label logprob from the first-token logprobs the engine returned."""
    sharing: dict[int, int] = {}
    for token in label_tokens.values():
        sharing[token] = sharing.get(token, 0) + 1
    out: dict[str, float | None] = {}
    for label, token in label_tokens.items():
        lp = token_logprobs.get(token)
        out[label] = None if lp is None else lp - math.log(sharing[token])
    return out
