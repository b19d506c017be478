"""The job's own map steps around the backend: prepare the rows, then select and cast the output.

Pure functions of Arrow batches, used by the labelling pipeline (`raycls.pipeline`), the
calibration pass (`raycls.calibration_prior`), the dry run and training's data reader.
"""

from __future__ import annotations

import pyarrow as pa

from raycls import schema
from raycls.config import JobSpec
from raycls.prompts import row_text, template_columns


def output_columns(spec: JobSpec, input_columns: list[str]) -> list[str]:
    """The output's columns in order: the id, the kept input columns, the result columns."""
    keep = spec.input.keep_columns if spec.input.keep_columns is not None else input_columns
    if spec.input.gold_column and spec.input.gold_column not in keep:
        keep = [*keep, spec.input.gold_column]
    return [schema.ID, *(schema.stored_name(c) for c in keep), *schema.RESULT_COLUMNS]


def prepare_batch(batch: pa.Table, text_template: str) -> pa.Table:
    """Add `_text` (the text to classify) and flag rows with nothing to classify."""
    columns = {c: batch.column(schema.stored_name(c)).to_pylist() for c in template_columns(text_template)}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    texts = [row_text(text_template, row) for row in rows]
    texts = [t if t is not None and t.strip() else None for t in texts]
    errors = [None if t is not None else schema.EMPTY_TEXT for t in texts]
    if schema.READ_ERROR in batch.column_names:  # flagged while read (raycls.readers, input_checks): that reason wins
        errors = [r or e for r, e in zip(batch.column(schema.READ_ERROR).to_pylist(), errors)]
        batch = batch.drop_columns([schema.READ_ERROR])
    batch = batch.append_column(schema.TEXT, pa.array(texts, pa.string()))
    batch = batch.append_column(schema.ERROR, pa.array(errors, pa.string()))
    return batch.append_column(schema.TRUNCATED, pa.array([False] * len(rows), pa.bool_()))


def finalize_batch(batch: pa.Table, columns: list[str], result_types: pa.Schema, input_types: pa.Schema) -> pa.Table:
    """Select and cast the output columns, so every file written has the same schema."""
    arrays, fields = [], []
    for name in columns:
        if name in result_types.names:
            field = result_types.field(name)
        elif name == schema.ID:
            field = pa.field(schema.ID, pa.string())
        else:
            field = input_types.field(name)
        column = batch.column(name) if name in batch.column_names else pa.nulls(batch.num_rows, field.type)
        arrays.append(column.cast(field.type) if column.type != field.type else column)
        fields.append(field)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
