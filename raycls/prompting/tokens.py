"""Token budgets, worked out in one place for every backend and for `--dry-run`.

A request holds the fixed part of the prompt (instructions, labels, few-shot examples),
the row's text and the answer; the context window must hold all three plus a little
slack. What is left for the text is the budget a longer text is cut to (and flagged
`truncated`). With the model's tokenizer at hand (vLLM) the counts are exact; through an
API they are estimated high (about 4 ASCII characters per token, one token per other
character, CJK text runs close to that), the safe side for a cost estimate or a
rate-limit reservation; the server's reported usage replaces the estimate once it answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from raycls.errors import SpecError

if TYPE_CHECKING:
    from raycls.prompting.prompts import PromptPlan

SAFETY_TOKENS = 8
"""Slack for special tokens the engine or server adds (BOS, chat roles) and tokenizer boundary effects."""
MIN_TEXT_TOKENS = 16
"""A context that leaves the text fewer tokens than this is a spec error, not a run of empty texts."""
MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat message costs beyond its content (role and separators), when estimated."""
LABEL_MAX_TOKENS = 16
"""Least answer cap for a bare label when the provider's tokenizer is unknown."""
JSON_MAX_TOKENS = 64
"""Default answer cap for a JSON answer without reasoning."""
REASONING_MAX_TOKENS = 256
"""Default answer cap for a JSON answer with a short reasoning first."""


@dataclass(frozen=True)
class TokenBudget:
    """How a row's request is sized: what the run does and what `--dry-run` counts."""

    prompt: int
    """Tokens of the fixed part of the prompt."""
    answer: int
    """The answer cap (`max_tokens`)."""
    text: int | None
    """Tokens left for a row's text; None when unbounded (no context window known)."""
    tokenizer: str | None = None
    """A local model directory whose tokenizer counts exactly; None: counts are estimates."""


def estimate_tokens(text: str) -> int:
    """Tokens in `text`, estimated high: ASCII at 4 characters per token, anything else 1 each."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


def truncate_to_tokens(text: str, budget: int) -> tuple[str, bool]:
    """Cut `text` so that `estimate_tokens` of it stays within `budget`; returns (text, was_cut)."""
    if estimate_tokens(text) <= budget:
        return text, False
    cost, limit = 0.0, max(0, budget)
    for i, ch in enumerate(text):
        cost += 0.25 if ord(ch) < 128 else 1.0
        if math.ceil(cost) > limit:
            return text[:i], True
    return text, False


def answer_tokens(max_tokens: int | None, plan: "PromptPlan", answers: list[str],
                  count: Callable[[str], int] | None = None) -> int:
    """`max_tokens`, or enough for the answer the prompt asks for.

    `answers` are the strings a bare-label answer can be; `count` is the model's exact
    token count, or None to estimate (then with room for a tokenizer we do not know).
    """
    if max_tokens:
        return max_tokens
    if plan.expects_json:
        return REASONING_MAX_TOKENS if plan.reasoning else JSON_MAX_TOKENS
    if count is None:
        return max(LABEL_MAX_TOKENS, max(estimate_tokens(a) for a in answers) + 4)
    return max(count(a) for a in answers) + 1


def text_budget(context: int | None, prompt: int, answer: int, key: str) -> int | None:
    """Tokens left for a row's text in a `context`-token window (None: unbounded).

    Raises SpecError naming `key` (the setting that holds the context) with the numbers
    when the prompt and the answer leave the text less than `MIN_TEXT_TOKENS`.
    """
    if context is None:
        return None
    budget = context - prompt - answer - SAFETY_TOKENS
    if budget < MIN_TEXT_TOKENS:
        raise SpecError(
            key,
            f"{context} leaves {budget} tokens for the text (the prompt takes {prompt}, the answer up to "
            f"{answer}, slack {SAFETY_TOKENS}); raise it, shorten the prompt or lower backend.max_tokens",
        )
    return budget
