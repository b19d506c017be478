"""Column names and the output schema, defined once.

Every module that reads or writes a result column uses these names. Columns that
start with `_` are working columns: they travel between stages and are dropped
before the output is written.
"""

from __future__ import annotations

import pyarrow as pa

ID = "id"
LABEL = "label"
CONFIDENCE = "confidence"
LABEL_PROBS = "label_probs"
REASONING = "reasoning"
RAW_OUTPUT = "raw_output"
ERROR = "error"
TRUNCATED = "truncated"
MODEL = "model"
PROMPT_ID = "prompt_id"
INPUT_TOKENS = "input_tokens"
OUTPUT_TOKENS = "output_tokens"
MULTI_LABEL = "multi_label"
"""True when the raw answer named several labels (seen before any constraint or parsing)."""
LABEL_PROBS_RAW = "label_probs_raw"
"""The model's label probabilities before calibration (null when `calibration` is `none`)."""
CACHED = "cached"
"""True when the result came from the response cache (`raycls.backends.cache`): no model was asked."""

TEXT = "_text"
"""The text to classify (the column, or the `input.text` template rendered)."""
PROMPT = "_prompt"
"""The rendered prompt: a string for completion endpoints."""
CACHE_KEY = "raycls_cache_key"
"""Working column of the response cache: the row's cache key, on rows sent to the model.
(No leading `_`: backends keep only un-prefixed columns of their input; the output drops it.)"""
CACHE_HIT = "raycls_cache_hit"
"""Working column of the response cache: the cached result (JSON) of a row the model skips."""
LABEL_ID = "_label_id"
"""Working column of training rows (`raycls.train`): the gold label's class id."""
READ_ERROR = "_read_error"
"""An error code given to a row while it was read (`decode_error`, `duplicate_id`); the
prepare step moves it into `error`. Present only in blocks that have such a row."""

RESULT_COLUMNS = (
    LABEL, CONFIDENCE, LABEL_PROBS, REASONING, RAW_OUTPUT, ERROR, TRUNCATED,
    MULTI_LABEL, MODEL, PROMPT_ID, INPUT_TOKENS, OUTPUT_TOKENS, LABEL_PROBS_RAW, CACHED,
)

RESERVED = frozenset((ID, TEXT, PROMPT, READ_ERROR, *RESULT_COLUMNS))


def stored_name(column: str) -> str:
    """The name an input column has in the pipeline and the output.

    Input columns that collide with ours (a gold column called `label`, say) get an
    `input_` prefix, so the gold label and the predicted label both survive.
    """
    return f"input_{column}" if column in RESERVED else column


# Error codes a row can carry in `error`. A row with an error keeps its place in the output.
EMPTY_TEXT = "empty_text"
UNPARSEABLE = "unparseable_output"
ENGINE_ERROR = "engine_error"
API_ERROR = "api_error"
BUDGET_EXHAUSTED = "budget_exhausted"
DECODE_ERROR = "decode_error"
"""A line that was not valid in `input.encoding`, decoded with U+FFFD (`input.encoding_errors: replace`)."""
DUPLICATE_ID = "duplicate_id"
"""A later row with an id seen before (`input.duplicate_ids: keep_first`); its id gets a `#n` suffix."""
DEFERRED = "batch_pending"
"""A row whose answer is not in yet (batch mode: its batch still runs). Never written: the
row is asked again in the job's next pass; the response cache neither stores nor remembers it."""
CACHE_HIT_MARK = "cache_hit"
"""Set in `error` while a cached row passes the backend (so it costs no call); never written."""


def result_schema(label_names: list[str]) -> pa.Schema:
    """Arrow types of the result columns; `label_probs` is a struct with one field per label."""
    probs = pa.struct([pa.field(name, pa.float64()) for name in label_names])
    return pa.schema(
        [
            pa.field(LABEL, pa.string()),
            pa.field(CONFIDENCE, pa.float64()),
            pa.field(LABEL_PROBS, probs),
            pa.field(REASONING, pa.string()),
            pa.field(RAW_OUTPUT, pa.string()),
            pa.field(ERROR, pa.string()),
            pa.field(TRUNCATED, pa.bool_()),
            pa.field(MULTI_LABEL, pa.bool_()),
            pa.field(MODEL, pa.string()),
            pa.field(PROMPT_ID, pa.string()),
            pa.field(INPUT_TOKENS, pa.int64()),
            pa.field(OUTPUT_TOKENS, pa.int64()),
            pa.field(LABEL_PROBS_RAW, probs),
            pa.field(CACHED, pa.bool_()),
        ]
    )


def empty_result(**values: object) -> dict[str, object]:
    """A result row with every column present; callers fill in what they know."""
    row: dict[str, object] = {name: None for name in RESULT_COLUMNS}
    row.update({TRUNCATED: False, MULTI_LABEL: False, INPUT_TOKENS: 0, OUTPUT_TOKENS: 0, CACHED: False})
    row.update(values)
    return row
