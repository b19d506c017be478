"""The job's Ray session: joining or starting Ray, and the Ray Data settings the job's own reads need."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import ray
import ray.data

from raycls.job import console

MIN_LOCAL_CPUS = 4
"""Logical CPUs of a Ray that a job starts on its own machine (at least the real count)."""


def init_ray(verbose: bool = False, worker_output: bool = False) -> None:
    """Join the cluster (`RAY_ADDRESS`, `ray job submit`, a local `ray start`) or start Ray here.

    A no-op when Ray is already up: library callers who start Ray themselves keep their
    settings, and the CLI starts it first with the console's (`console.ray_init_kwargs`).

    A Ray started here gets at least `MIN_LOCAL_CPUS` logical CPUs: on resume, Ray's
    checkpoint filter holds one whole CPU per actor (not configurable in Ray 2.60), an
    engine or API-caller actor holds more, and on a 2-core machine the pipeline's own
    1-CPU tasks then never get scheduled: the run hangs at 0 rows (seen in the crash tests).
    """
    if ray.is_initialized():
        return
    quiet = console.ray_init_kwargs(verbose, worker_output)
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


def read_parquet(path: str, **kwargs) -> "ray.data.Dataset":
    """`ray.data.read_parquet` for the job's own small reads (the row check, the metrics),
    without the bar Ray 2.60 shows while it samples the files ("Parquet dataset sampling").
    The Dataset keeps the progress setting the job has: it copies the context it is made in."""
    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        ds = ray.data.read_parquet(path, **kwargs)
    finally:
        context.enable_progress_bars = before
    ds.context.enable_progress_bars = before
    return ds


def cluster_has_gpus() -> bool:
    """Whether the cluster the job runs on (joined or started here) has GPUs."""
    init_ray()
    return ray.cluster_resources().get("GPU", 0) > 0
