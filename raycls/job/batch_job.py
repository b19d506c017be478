"""A job in batch mode (`backend.mode: batch`): passes of the ordinary pipeline around the
Batch API's long waits; `raycls status` and `raycls cancel` for an output's batches.

    collect what finished → write pass (writes collected rows, records the rest as pending)
      → submit pending rows no batch holds → wait (unless --no-wait) → again

Ends when a pass leaves nothing pending: then the rows-out check, the metrics and the
finished manifest, as in `pipeline.run_job`. With `--no-wait` (or after `raycls cancel`)
it ends after submitting, exit 0, the output unfinished; the same command later collects.
See `raycls.backends.api.batch` for why passes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from raycls import storage

from raycls.job import resume
from raycls.backends.api.batch_state import BatchState, summary
from raycls.config import JobSpec
from raycls.errors import SpecError

log = logging.getLogger(__name__)


def run_batch_job(spec: JobSpec, overwrite: bool = False, files: Any = None, no_wait: bool = False):
    """Like `pipeline.run_job`, in passes; returns its JobResult (`metrics["pending"]` when it left early)."""
    from raycls.backends import create_backend
    from raycls.backends.api.batch import drop_pending
    from raycls.backends.api.batch_rounds import final_results
    from raycls.quality.prior import measure_prior
    from raycls.backends import cache
    from raycls.inputs.datasource import pyarrow_filesystem
    from raycls.job.outcome import JobResult, check_rows_written, summarize
    from raycls.job.session import init_ray, parquet_reads_v1
    from raycls.inputs.sources import check_input, input_source, resolve_input
    from raycls.job.stages import build_dataset
    from raycls.prompting.prompts import build_plan
    from raycls.quality.review import write_review

    started = time.monotonic()
    if spec.calibration.method != "none":
        raise SpecError("calibration.method", "is not available with backend.mode: batch yet; use mode: sync")
    plan = build_plan(spec)
    resume.preflight(spec, plan, overwrite)
    init_ray()
    labeller = create_backend(spec, plan)
    backend = cache.wrap(labeller, spec, plan)  # behind the response cache, or bare
    try:
        backend.prepare()
        files = files or resolve_input(spec.input)
        check_input(spec.input, files)
        source = input_source(spec.input, files, limit=spec.limit)
        prior = measure_prior(spec, plan, backend, files)
        with resume.begin(spec, plan, overwrite=overwrite) as run:
            state = BatchState.of(run.output)
            if overwrite:
                state.clear()
            b = spec.backend
            state.write_job({"base_url": b.base_url, "endpoint": b.endpoint, "model": b.model, "api_keys": list(b.api_keys)})
            driver = labeller.start(state)
            passes = 0
            while True:
                driver.poll()  # collect what finished since the last look
                pass_url = state.new_pass()
                labeller.begin_pass(pass_url, final_results(driver.latest))
                ds = build_dataset(spec, backend, files, source, prior and prior.probs)
                ds = ds.map_batches(drop_pending, fn_kwargs={"pass_url": pass_url}, batch_format="pyarrow")
                ds.context.checkpoint_config = run.checkpoint_config()
                filesystem, data_path = pyarrow_filesystem(run.data)
                with parquet_reads_v1():
                    ds.write_parquet(data_path, filesystem=filesystem)
                passes += 1
                dropped = state.read_pending(storage.join(pass_url, "dropped")).num_rows
                pending = state.read_pending(storage.join(pass_url, "submit"))
                state.drop_pass(pass_url)
                if dropped == 0:
                    break
                held = driver.in_flight_ids()
                todo = {}
                for rid, text, cut in zip(*(pending.column(c).to_pylist() for c in ("id", "text", "truncated"))):
                    if rid not in held:
                        todo[rid] = (rid, text, cut)  # a retried map task may record a row twice
                if todo and not driver.stopped_by_cancel:
                    driver.submit(list(todo.values()))
                if no_wait or driver.stopped_by_cancel:
                    return JobResult(run.output, _left_waiting(run.output, driver, dropped, no_wait))
                driver.wait()
            rows_read = check_rows_written(source, run.data, backend)
            metrics = summarize(spec, backend, run.output, time.monotonic() - started, resumed_rows=run.resumed_rows,
                                rows_read=rows_read, prior=prior)
            metrics["batch_passes"] = passes
            write_review(spec, run.output, metrics)
            run.finish(metrics)
    finally:
        backend.close()
    return JobResult(run.output, metrics)


def _left_waiting(output: str, driver: Any, pending: int, no_wait: bool) -> dict[str, Any]:
    in_flight = len(driver.in_flight_ids())
    why = "--no-wait" if no_wait else "batches were cancelled by `raycls cancel`"
    print(f"batch mode ({why}): {pending} rows not written yet, {in_flight} in batches at the provider "
          f"({len(driver.open_records())} open batch file(s)).\n"
          f"  see them:   raycls status --output {output}\n"
          f"  collect:    run the same `raycls run` command again (e.g. from cron); it writes what finished "
          f"and submits the rest", flush=True)
    return {"pending": pending, "rows_in_flight": in_flight, "batch": dict(driver.counters)}


def _driver_for(output: str):
    """A driver for an output's batches from its state alone (`job.json` names provider and key references)."""
    from raycls.backends.api.answers import RequestPlan
    from raycls.backends.api.keys import resolve_keys
    from raycls.backends.api.batch_rounds import BatchDriver
    from raycls.config import OpenAIConfig

    state = BatchState.of(output)
    job = state.job()
    if job is None:
        return state, None
    backend = OpenAIConfig(kind="openai", base_url=job["base_url"], model=job["model"], api_keys=job["api_keys"],
                            endpoint=job["endpoint"], mode="batch")
    plan = RequestPlan(backend, None, 1)  # type: ignore[arg-type]  # polling and cancelling build no request
    return state, BatchDriver(backend, plan, None, "", state, resolve_keys(backend.api_keys))


def batch_status(output: str, poll: bool = True) -> dict[str, Any] | None:
    """`raycls status` for batch mode: each batch's state and row counts (polled now when the keys can be read)."""
    state, driver = _driver_for(output)
    if driver is None:
        return None
    found: dict[str, Any] = {}
    if poll and driver.open_records():
        try:
            for record in driver.open_records():
                if record.get("batch_id"):
                    batch, _ = driver._call(lambda key: driver.client.retrieve(key, record["batch_id"]), record["key"])
                    record.update(status=batch.get("status"), request_counts=batch.get("request_counts"),
                                  checked_at=storage.utc_now())
                    state.save(record)
        except Exception as exc:  # status still shows what was recorded
            found["poll_error"] = f"{type(exc).__name__}: {exc}"[:200]
    found.update(summary(state))
    return found


def batch_cancel(output: str) -> int:
    """`raycls cancel`: cancel this output's in-flight batches; returns how many were asked."""
    _, driver = _driver_for(output)
    if driver is None:
        raise SpecError("--output", f"{output} holds no batch-mode state ({BatchState.of(output).root} is missing)")
    return driver.cancel_all()
