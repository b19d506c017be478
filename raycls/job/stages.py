"""The job's own map steps around the backend, and the lazy Dataset they make: read →
prepare → the backend → names and calibration → select and cast the output.

Pure functions of Arrow batches, used by the labelling pipeline (`raycls.job.pipeline`), the
calibration pass (`raycls.quality.prior`), the dry run and training's data reader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from raycls import schema

from raycls.quality import calibration
from raycls.config import JobSpec
from raycls.prompting.prompts import build_plan, row_text, template_columns
from raycls.inputs.sources import check_input, input_source, resolve_input

if TYPE_CHECKING:
    from raycls.backends import Backend
    from raycls.inputs.datasource import InputFiles


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
    if schema.READ_ERROR in batch.column_names:  # flagged while read (raycls.inputs.readers, input_checks): that reason wins
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


def build_dataset(spec: JobSpec, backend: "Backend", files: "InputFiles | None" = None,
                  source=None, prior: dict[str, float] | None = None):
    """The lazy Dataset of labelled rows: nothing runs until it is written or iterated.

    `backend` is prepared (`Backend.prepare`). `files` narrows the input to some of its
    files (incremental runs); ids stay relative to the input root. `limit` is applied
    inside the read, before Ray's checkpoint filter.
    """
    files = files or resolve_input(spec.input)
    input_schema = check_input(spec.input, files)
    import ray.data

    ds = ray.data.read_datasource(source or input_source(spec.input, files, limit=spec.limit))
    ds = ds.map_batches(prepare_batch, fn_kwargs={"text_template": spec.input.text}, batch_format="pyarrow")
    ds = backend.label(ds)
    ds = calibration.finish(ds, build_plan(spec), prior)  # answer words -> label names, then calibration
    columns = output_columns(spec, input_schema.names)
    input_types = pa.schema([f.with_name(schema.stored_name(f.name)) for f in input_schema])
    return ds.map_batches(
        finalize_batch,
        fn_kwargs={"columns": columns, "result_types": schema.result_schema(spec.label_names), "input_types": input_types},
        batch_format="pyarrow",
    )
