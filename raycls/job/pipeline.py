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

from raycls.backends import cache

from raycls.job import lease

from raycls.job import resume
from raycls.backends import create_backend
from raycls.quality.prior import measure_prior
from raycls.config import JobSpec
from raycls.inputs.datasource import InputFiles, pyarrow_filesystem
from raycls.job.outcome import JobResult, check_rows_written, summarize
from raycls.prompting.prompts import build_plan
from raycls.quality.review import write_review
from raycls.job.session import MIN_LOCAL_CPUS, init_ray, parquet_reads_v1  # noqa: F401 (also the job's API)
from raycls.inputs.sources import check_input, input_source, resolve_input
from raycls.job.stages import build_dataset, finalize_batch, output_columns, prepare_batch  # noqa: F401

log = logging.getLogger(__name__)

DATA_DIR = resume.DATA_DIR
"""Subdirectory of `output.path` holding the annotated Parquet files."""
METRICS_FILE = resume.METRICS_FILE


def run_job(spec: JobSpec, overwrite: bool = False, files: InputFiles | None = None, no_wait: bool = False) -> JobResult:
    """Label the input, write annotated Parquet and `metrics.json`, print the summary.

    Resumable (see `raycls.job.resume`): the same call after any interruption labels only the
    rows not yet written. The output is marked finished only once the ids written equal
    the ids read (`raycls.job.rowcheck`). `overwrite` replaces a finished output instead of
    refusing to redo it. `files` narrows the input to some of its files (incremental runs).
    Raises `LeaseLost` when another run takes the output over meanwhile.
    """
    if getattr(spec.backend, "mode", "sync") == "batch":  # the provider's Batch API: passes around long waits
        from raycls.job.batch_job import run_batch_job

        return run_batch_job(spec, overwrite, files, no_wait)
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
        ds = build_dataset(spec, backend, files, source, prior and prior.probs)  # the input is checked before the output is touched
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


