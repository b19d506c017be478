"""Training rows: read with Ray Data, cleaned, counted, checked and split.

Rows come from a labelled input (`data.path` + `data.label_column`, read like a job's
input, with stable ids) or from a finished raycls output (`data.from_output`: its `label`
column, rows without `error`, optionally only those with `confidence >= min_confidence`).
Every row read is either used or skipped with a reason, and the counts go to
`train_metrics.json`. Counting runs where the blocks lie; only a small table of
(reason, label) counts reaches the driver. Bad data that would make training meaningless
(labels outside the set, classes with too few rows) stops here, before any model loads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from raycls import schema, storage

from raycls.job import resume
from raycls.config import InputSpec
from raycls.errors import InputError
from raycls.inputs.datasource import InputDatasource, check_input, pyarrow_filesystem, resolve_input
from raycls.job.stages import prepare_batch
from raycls.prompting.prompts import template_columns
from raycls.train.spec import TrainSpec

LABEL = "_label"
"""The row's training label as read (a string, or None)."""
LABEL_ID = schema.LABEL_ID
"""Index of the label in the spec's `labels` (the class id the head learns)."""
SKIP = "_skip"
"""Why a row is not used (None when it is)."""

# Why a row read is not trained on (keys of `rows_skipped` in train_metrics.json).
SKIP_EMPTY = schema.EMPTY_TEXT
SKIP_NO_LABEL = "missing_label"
SKIP_UNKNOWN = "unknown_label"
SKIP_ERROR = "labelled_with_error"
SKIP_LOW_CONFIDENCE = "below_min_confidence"

_EXAMPLES = 5


@dataclass
class TrainData:
    """The cleaned rows (`_text`, `_label_id`) for training and validation, and the counts."""

    train: Any
    validation: Any
    counts: dict[str, Any] = field(default_factory=dict)


def load_data(spec: TrainSpec) -> TrainData:
    """Read, clean, count and split the training rows; raises on data that cannot train a head."""
    labels = spec.label_names
    ds = _read_source(spec).materialize()
    counts = count_rows(ds, labels)
    check_counts(counts, spec)
    usable = ds.map_batches(_usable, fn_kwargs={"labels": labels}, batch_format="pyarrow")
    if spec.validation.path is not None:
        train = usable
        val_spec = InputSpec(path=spec.validation.path, text=spec.data.text, gold_column=spec.validation.label_column)
        val_raw = _read_input(val_spec, None, spec.validation.label_column).materialize()
        val_counts = count_rows(val_raw, labels)
        validation = val_raw.map_batches(_usable, fn_kwargs={"labels": labels}, batch_format="pyarrow").select_columns([schema.TEXT, LABEL_ID])
        train = train.select_columns([schema.TEXT, LABEL_ID])
        counts["validation_rows_read"] = val_counts["rows_read"]
        counts["validation_rows_skipped"] = val_counts["rows_skipped"]
    else:
        fraction, seed = spec.validation.held_out, spec.validation.seed
        train = usable.map_batches(_split, fn_kwargs={"fraction": fraction, "seed": seed, "keep": False}, batch_format="pyarrow")
        validation = usable.map_batches(_split, fn_kwargs={"fraction": fraction, "seed": seed, "keep": True}, batch_format="pyarrow")
    train, validation = train.materialize(), validation.materialize()
    counts["rows_train"] = train.count()
    counts["rows_validation"] = validation.count()
    if counts["rows_train"] == 0 or counts["rows_validation"] == 0:
        raise InputError(_source_name(spec), f"{counts['rows_train']} training and {counts['rows_validation']} validation rows: both need rows")
    return TrainData(train, validation, counts)


def _source_name(spec: TrainSpec) -> str:
    return spec.data.path or spec.data.from_output or ""


def _read_source(spec: TrainSpec):
    """Rows with `id`, `_text`, `_label` and `_skip`, from a labelled input or a raycls output."""
    data = spec.data
    if data.from_output is None:
        input_spec = InputSpec(path=data.path, format=data.format, text=data.text, id_column=data.id_column, gold_column=data.label_column)
        return _read_input(input_spec, data.limit, data.label_column)
    out = check_output_dir(data.from_output)
    filesystem, path = pyarrow_filesystem(storage.join(out, resume.DATA_DIR))
    ds = ray.data.read_parquet(path, filesystem=filesystem)
    missing = [c for c in [schema.LABEL, schema.ERROR, schema.CONFIDENCE, *map(schema.stored_name, template_columns(data.text))] if c not in ds.columns()]
    if missing:
        raise InputError(out, f"the output has no column(s) {missing} (data.text must name input columns the output kept); its columns are {ds.columns()}")
    if data.limit:
        ds = ds.limit(data.limit)
    ds = ds.map_batches(_llm_labels, fn_kwargs={"min_confidence": data.min_confidence}, batch_format="pyarrow")
    return ds.map_batches(_with_text, fn_kwargs={"text": data.text}, batch_format="pyarrow")


def _read_input(input_spec: InputSpec, limit: int | None, label_column: str):
    files = resolve_input(input_spec)
    check_input(input_spec, files)
    ds = ray.data.read_datasource(InputDatasource(input_spec, files, limit=limit))
    ds = ds.map_batches(_gold_labels, fn_kwargs={"column": schema.stored_name(label_column)}, batch_format="pyarrow")
    return ds.map_batches(_with_text, fn_kwargs={"text": input_spec.text}, batch_format="pyarrow")


def check_output_dir(url: str) -> str:
    """A raycls output directory that finished: the only kind whose labels are complete."""
    out = url.rstrip("/")
    manifest = storage.read_json(storage.join(out, resume.MANIFEST_FILE))
    if manifest is None:
        raise InputError(out, f"not a raycls output: no {resume.MANIFEST_FILE} (data.from_output takes the output.path of a labelling job)")
    if not manifest.get("finished"):
        raise InputError(out, "this raycls output is unfinished (its run was interrupted): run the same job again to finish it, then train")
    return out


def _gold_labels(batch: pa.Table, column: str) -> pa.Table:
    values = batch.column(column).cast(pa.string())
    values = pc.if_else(pc.equal(pc.utf8_trim_whitespace(values), ""), pa.scalar(None, pa.string()), values)
    skip = pc.if_else(values.is_null(), pa.scalar(SKIP_NO_LABEL), pa.scalar(None, pa.string()))
    return batch.append_column(LABEL, values).append_column(SKIP, skip)


def _llm_labels(batch: pa.Table, min_confidence: float | None) -> pa.Table:
    """The LLM's label, and why a row is not trained on: it failed, or it is not confident enough."""
    rows = batch.select([schema.LABEL, schema.ERROR, schema.CONFIDENCE]).to_pylist()
    reasons = []
    for row in rows:
        if row[schema.ERROR] is not None or row[schema.LABEL] is None:
            reasons.append(SKIP_ERROR)
        elif min_confidence is not None and (row[schema.CONFIDENCE] is None or row[schema.CONFIDENCE] < min_confidence):
            reasons.append(SKIP_LOW_CONFIDENCE)
        else:
            reasons.append(None)
    batch = batch.append_column(LABEL, batch.column(schema.LABEL).cast(pa.string()))
    batch = batch.drop_columns([c for c in schema.RESULT_COLUMNS if c in batch.column_names])
    return batch.append_column(SKIP, pa.array(reasons, pa.string()))


def _with_text(batch: pa.Table, text: str) -> pa.Table:
    """`_text` rendered as a labelling job renders it; an empty text is skipped (first reason wins)."""
    batch = prepare_batch(batch, text)
    skip = pc.coalesce(batch.column(SKIP), batch.column(schema.ERROR))
    return pa.table({schema.ID: batch.column(schema.ID), schema.TEXT: batch.column(schema.TEXT),
                     LABEL: batch.column(LABEL), SKIP: skip})


def count_rows(ds, labels: list[str]) -> dict[str, Any]:
    """Rows read, skipped by reason, per-class counts and the most frequent unknown labels."""
    parts = ds.map_batches(_count_block, batch_format="pyarrow", batch_size=None)
    table = pa.concat_tables(list(parts.iter_batches(batch_format="pyarrow", batch_size=None)))
    totals: dict[tuple[Any, Any], int] = {}
    for row in table.to_pylist():
        key = (row[SKIP], row[LABEL])
        totals[key] = totals.get(key, 0) + row["n"]
    known = set(labels)
    skipped: dict[str, int] = {}
    per_class = {name: 0 for name in labels}
    unknown: dict[str, int] = {}
    for (reason, label), n in totals.items():
        if reason is None and label not in known:
            unknown[label] = unknown.get(label, 0) + n
            reason = SKIP_UNKNOWN
        if reason is None:
            per_class[label] += n
        else:
            skipped[reason] = skipped.get(reason, 0) + n
    top = dict(sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))[:_EXAMPLES])
    return {"rows_read": sum(totals.values()), "rows_used": sum(per_class.values()), "rows_skipped": skipped,
            "per_class": per_class, "unknown_label_examples": top}


def _count_block(batch: pa.Table) -> pa.Table:
    grouped = batch.select([SKIP, LABEL]).group_by([SKIP, LABEL], use_threads=False).aggregate([([], "count_all")])
    return grouped.select([SKIP, LABEL, "count_all"]).rename_columns([SKIP, LABEL, "n"])


def check_counts(counts: dict[str, Any], spec: TrainSpec) -> None:
    """Refuse data that cannot train the head the spec asks for."""
    where = _source_name(spec)
    n_unknown = counts["rows_skipped"].get(SKIP_UNKNOWN, 0)
    if n_unknown and spec.data.unknown_labels == "error":
        examples = ", ".join(f"{k!r} ({v})" for k, v in counts["unknown_label_examples"].items())
        raise InputError(where, f"{n_unknown} row(s) have a label outside labels {spec.label_names}, e.g. {examples}; "
                                "fix the labels or set data.unknown_labels: skip")
    few = {name: n for name, n in counts["per_class"].items() if n < spec.data.min_rows_per_class}
    if few:
        listed = ", ".join(f"{name!r} ({n})" for name, n in few.items())
        raise InputError(where, f"too few training rows for label(s) {listed}: each needs at least "
                                f"data.min_rows_per_class = {spec.data.min_rows_per_class}")


def _usable(batch: pa.Table, labels: list[str]) -> pa.Table:
    """The rows to train on, with their class id: no skip reason and a known label."""
    index = {name: i for i, name in enumerate(labels)}
    ids = [index.get(label, -1) if reason is None else -1 for label, reason in zip(batch.column(LABEL).to_pylist(), batch.column(SKIP).to_pylist())]
    keep = pa.array([i >= 0 for i in ids])
    out = pa.table({schema.ID: batch.column(schema.ID), schema.TEXT: batch.column(schema.TEXT), LABEL_ID: pa.array(ids, pa.int64())})
    return out.filter(keep)


def held_out(row_id: str, seed: int, fraction: float) -> bool:
    """Whether a row is in the validation split: a hash of (seed, id), so it never changes."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _split(batch: pa.Table, fraction: float, seed: int, keep: bool) -> pa.Table:
    mask = [held_out(rid, seed, fraction) == keep for rid in batch.column(schema.ID).to_pylist()]
    return batch.filter(pa.array(mask, pa.bool_())).select([schema.TEXT, LABEL_ID])
