"""The end of a run: rows out = rows in, then the metrics and the summary.

Shared by the synchronous job (`raycls.job.pipeline`) and batch mode (`raycls.job.batch_job`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import ray.data
from ray.data.datasource import Datasource

from raycls import schema

from raycls.job import console

from raycls.job import resume

from raycls.job import rowcheck
from raycls.backends import Backend
from raycls.quality.prior import PriorPass, calibration_report
from raycls.config import JobSpec
from raycls.errors import BackendError, RowCountError
from raycls.inputs.datasource import pyarrow_filesystem
from raycls.quality.metrics import format_table, metrics_columns, reduce_output, write_metrics
from raycls.job.session import parquet_reads_v1, read_parquet

DATA_DIR = resume.DATA_DIR
"""Subdirectory of `output.path` holding the annotated Parquet files."""
METRICS_FILE = resume.METRICS_FILE


@dataclass
class JobResult:
    output_path: str
    metrics: dict[str, Any]


def check_rows_written(source: Datasource, data_url: str, backend: Backend) -> int:
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
              rows_read: int | None = None, prior: PriorPass | None = None) -> dict[str, Any]:
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
