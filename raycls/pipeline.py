"""Wiring: read → prepare → backend → finalize → write Parquet, then the rows-out check and
the metrics reduction.

The plan is linear on purpose (a Read at the start, map-style steps, a Write at the end):
that is the shape Ray Data's checkpointing needs to skip finished rows on resume. The
backend is whatever the spec names, behind the interface in `raycls.backends`; nothing
here knows which one it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
import ray.data

from raycls import cache, calibration, console, resume, rowcheck, schema
from raycls.session import MIN_LOCAL_CPUS, init_ray, parquet_reads_v1, read_parquet  # noqa: F401 (also the job's API)
from raycls.stages import finalize_batch, output_columns, prepare_batch  # noqa: F401
from raycls.calibration_prior import calibration_report, measure_prior
from raycls.backends import Backend, create_backend
from raycls.config import JobSpec
from raycls.errors import BackendError, RowCountError
from raycls.io import InputDatasource, InputFiles, pyarrow_filesystem
from raycls.sources import check_input, input_source, resolve_input
from raycls.metrics import format_table, metrics_columns, reduce_output, write_metrics
from raycls.prompts import build_plan
from raycls.review import write_review

log = logging.getLogger(__name__)

DATA_DIR = resume.DATA_DIR
"""Subdirectory of `output.path` holding the annotated Parquet files."""
METRICS_FILE = resume.METRICS_FILE


@dataclass
class JobResult:
    output_path: str
    metrics: dict[str, Any]


def build_dataset(spec: JobSpec, backend: Backend, files: InputFiles | None = None,
                  source: InputDatasource | None = None, prior: dict[str, float] | None = None):
    """The lazy Dataset of labelled rows: nothing runs until it is written or iterated.

    `backend` is prepared (`Backend.prepare`). `files` narrows the input to some of its
    files (incremental runs); ids stay relative to the input root. `limit` is applied
    inside the read, before Ray's checkpoint filter.
    """
    files = files or resolve_input(spec.input)
    input_schema = check_input(spec.input, files)
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


def run_job(spec: JobSpec, overwrite: bool = False, files: InputFiles | None = None) -> JobResult:
    """Label the input, write annotated Parquet and `metrics.json`, print the summary.

    Resumable (see `raycls.resume`): the same call after any interruption labels only the
    rows not yet written. The output is marked finished only once the ids written equal
    the ids read (`raycls.rowcheck`). `overwrite` replaces a finished output instead of
    refusing to redo it. `files` narrows the input to some of its files (incremental runs).
    """
    started = time.monotonic()
    plan = build_plan(spec)
    resume.preflight(spec, plan, overwrite)  # a finished or different output: refuse before Ray starts
    init_ray()
    backend = cache.wrap(create_backend(spec, plan), spec, plan)  # the response cache, unless the spec turns it off
    try:
        backend.prepare()  # the model, its labels, the keys: refused before any row is read
        files = files or resolve_input(spec.input)
        check_input(spec.input, files)  # missing columns, malformed lines: before the id pass
        source = input_source(spec.input, files, limit=spec.limit)  # the pass over ids: duplicates refused here
        prior = measure_prior(spec, plan, backend, files)  # None unless calibration is on: a first small pass
        ds = build_dataset(spec, backend, files, source, prior)  # the input is checked before the output is touched
        with resume.begin(spec, plan, overwrite=overwrite) as run:
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

    On a mismatch the run is not marked finished and stays resumable: a backend that gave
    up on rows (`Backend.stopped_early`, e.g. the API backend with no usable key left) says
    why in one line (BackendError); otherwise RowCountError names the missing and extra ids.
    """
    read = ray.data.read_datasource(source)
    filesystem, data_path = pyarrow_filesystem(data_url)
    with parquet_reads_v1():
        written = read_parquet(data_path, filesystem=filesystem, columns=[schema.ID])
        try:
            return rowcheck.check_rows(read, written)
        except RowCountError as exc:
            reason = backend.stopped_early()
            if reason is None:
                raise
            raise BackendError(f"{reason}: {exc.rows_read - exc.rows_written} of {exc.rows_read} rows were not labelled, nor written; "
                               "run the same command again to label them") from None


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
        return read_parquet(data_path, filesystem=filesystem, columns=columns)
