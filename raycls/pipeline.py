"""Wiring: read → prepare → backend → finalize → write Parquet, then the rows-out check and
the metrics reduction.

The plan is linear on purpose (a Read at the start, map-style steps, a Write at the end):
that is the shape Ray Data's checkpointing needs to skip finished rows on resume. The
backend is whatever the spec names, behind the interface in `raycls.backends`; nothing
here knows which one it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import ray
import ray.data

from raycls import calibration, console, lease, resume, rowcheck, schema
from raycls.calibration_prior import calibration_report, measure_prior
from raycls.backends import Backend, create_backend
from raycls.config import JobSpec
from raycls.errors import RowCountError
from raycls.io import InputDatasource, InputFiles, check_input, pyarrow_filesystem, resolve_input
from raycls.metrics import format_table, metrics_columns, reduce_output, write_metrics
from raycls.prompts import build_plan, row_text, template_columns
from raycls.review import write_review

log = logging.getLogger(__name__)

DATA_DIR = resume.DATA_DIR
"""Subdirectory of `output.path` holding the annotated Parquet files."""
METRICS_FILE = resume.METRICS_FILE


@dataclass
class JobResult:
    output_path: str
    metrics: dict[str, Any]


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


def build_dataset(spec: JobSpec, backend: Backend, files: InputFiles | None = None,
                  source: InputDatasource | None = None, prior: dict[str, float] | None = None):
    """The lazy Dataset of labelled rows: nothing runs until it is written or iterated.

    `backend` is prepared (`Backend.prepare`). `files` narrows the input to some of its
    files (incremental runs); ids stay relative to the input root. `limit` is applied
    inside the read, before Ray's checkpoint filter.
    """
    files = files or resolve_input(spec.input)
    input_schema = check_input(spec.input, files)
    ds = ray.data.read_datasource(source or InputDatasource(spec.input, files, limit=spec.limit))
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


MIN_LOCAL_CPUS = 4
"""Logical CPUs of a Ray that a job starts on its own machine (at least the real count)."""


def init_ray() -> None:
    """Join the cluster (`RAY_ADDRESS`, `ray job submit`, a local `ray start`) or start Ray here.

    A Ray started here gets at least `MIN_LOCAL_CPUS` logical CPUs: on resume, Ray's
    checkpoint filter holds one whole CPU per actor (not configurable in Ray 2.60), an
    engine or API-caller actor holds more, and on a 2-core machine the pipeline's own
    1-CPU tasks then never get scheduled: the run hangs at 0 rows (seen in the crash tests).
    """
    if ray.is_initialized():
        return
    quiet = console.ray_init_kwargs()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, MIN_LOCAL_CPUS), **quiet)
    except ValueError:  # a cluster from `ray start` runs here: join it as it is
        ray.init(**quiet)


@contextlib.contextmanager
def parquet_reads_v1() -> Iterator[None]:
    """Ray Data's V1 Parquet reader for the reads planned inside (then back to the default).

    Two reads of many small files need it. Ray loads the checkpoint with
    `ray.data.read_parquet` when the write is planned, and a run leaves one checkpoint file
    per written batch (15,625 for 1M rows at batch size 64): Ray 2.60's default V2 reader
    read them in one task that started a thread per file and did not finish in 8 minutes
    on a 2-core machine, where V1 loads them in ~25 s (BENCHMARKS.md). And the metrics
    pass: V2 starts footer-reader actors (a process each) to plan a read, which cost more
    than the whole reduction on a small cluster (92 s for 120 rows on a busy 2-core box).
    """
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = before


def run_job(spec: JobSpec, overwrite: bool = False, files: InputFiles | None = None) -> JobResult:
    """Label the input, write annotated Parquet and `metrics.json`, print the summary.

    Resumable (see `raycls.resume`): the same call after any interruption labels only the
    rows not yet written. The output is marked finished only once the ids written equal
    the ids read (`raycls.rowcheck`). `overwrite` replaces a finished output instead of
    refusing to redo it. `files` narrows the input to some of its files (incremental runs).
    Raises `LeaseLost` when another run takes the output over meanwhile.
    """
    started = time.monotonic()
    plan = build_plan(spec)
    resume.preflight(spec, plan, overwrite)  # a finished or different output: refuse before Ray starts
    init_ray()
    backend = create_backend(spec, plan)
    try:
        backend.prepare()  # the model, its labels, the keys: refused before any row is read
        files = files or resolve_input(spec.input)
        check_input(spec.input, files)  # missing columns, malformed lines: before the id pass
        source = InputDatasource(spec.input, files, limit=spec.limit)  # the pass over ids: duplicates refused here
        prior = measure_prior(spec, plan, backend, files)  # None unless calibration is on: a first small pass
        ds = build_dataset(spec, backend, files, source, prior)  # the input is checked before the output is touched
        with resume.begin(spec, plan, overwrite=overwrite) as run, lease.lost_as_error(run.lease):
            ds.context.checkpoint_config = run.checkpoint_config()
            filesystem, data_path = pyarrow_filesystem(run.data)
            with parquet_reads_v1():
                ds.write_parquet(data_path, filesystem=filesystem)
            rows_read = check_rows_written(source, run.data, backend)
            elapsed = time.monotonic() - started
            metrics = summarize(spec, backend, run.output, elapsed, resumed_rows=run.resumed_rows,
                                rows_read=rows_read, prior=prior)
            write_review(spec, run.output, metrics)  # output.review: the doubtful rows for a person, under review/
            run.finish(metrics)
    finally:
        backend.close()
    return JobResult(run.output, metrics)


def check_rows_written(source: InputDatasource, data_url: str, backend: Backend) -> int:
    """Rows out = rows in, by id, over every attempt; returns the rows read.

    On a mismatch, a backend that knows why rows are missing (the API backend after its
    last key was revoked) says so through `report`; otherwise RowCountError names the
    missing and extra ids. Either way the run is not marked finished and stays resumable.
    """
    read = ray.data.read_datasource(source)
    filesystem, data_path = pyarrow_filesystem(data_url)
    with parquet_reads_v1():
        written = ray.data.read_parquet(data_path, filesystem=filesystem, columns=[schema.ID])
        try:
            return rowcheck.check_rows(read, written)
        except RowCountError:
            backend.report({})
            raise


def summarize(spec: JobSpec, backend: Backend, out: str, elapsed_s: float, resumed_rows: int = 0,
              rows_read: int | None = None, prior: dict[str, float] | None = None) -> dict[str, Any]:
    """Reduce the written output to metrics, write `metrics.json` and print the table.

    The figures cover every row in the output, earlier attempts' included; `rows_per_s`
    counts only the rows this attempt labelled (`rows_resumed` were already there).
    """
    gold = schema.stored_name(spec.input.gold_column) if spec.input.gold_column else None
    written = read_for_metrics(f"{out}/{DATA_DIR}", gold)
    metrics = {"rows_read": rows_read, **reduce_output(written, spec.label_names, gold)}
    metrics["elapsed_s"] = round(elapsed_s, 3)
    metrics["rows_resumed"] = resumed_rows
    done_now = metrics["rows_written"] - resumed_rows
    metrics["rows_per_s"] = round(done_now / elapsed_s, 3) if elapsed_s > 0 else None
    metrics["model"] = spec.backend.model
    metrics["prompt"] = spec.prompt
    metrics["calibration"] = calibration_report(spec, prior)
    metrics.update(backend.report(metrics))  # e.g. cost and request figures of the API backend
    write_metrics(metrics, f"{out}/{METRICS_FILE}")
    print(format_table(metrics), flush=True)
    logs = console.ray_log_dir()
    if logs:
        print(f"Ray's logs: {logs}", flush=True)
    return metrics


def read_for_metrics(data_url: str, gold: str | None):
    """The written output, only the columns the metrics need."""
    filesystem, data_path = pyarrow_filesystem(data_url)
    columns = [c for c in (gold, *metrics_columns()) if c]
    with parquet_reads_v1():
        return ray.data.read_parquet(data_path, filesystem=filesystem, columns=columns)
