"""Resume at scale: what 1,000,000 finished rows cost a resumed run, and what a crash costs.

`python benchmarks/resume_scale.py [--finished 1000000] [--unfinished 100] [--crashes 3]`
prints one JSON line per figure:

(a) `resume_overhead`: a Ray Data checkpoint of `--finished` ids, in Ray's own file format
    and naming (`--ids-per-file` ids per file; `--ids-per-file 0` builds it with Ray's own
    checkpointing writer from a read → write pipeline instead, slow beyond ~100k ids),
    then `python jobs/classify.py` resumed over an input of finished + unfinished rows
    (it labels only the unfinished ones through the fake API), versus the same job over
    the unfinished rows alone with no checkpoint. The difference is what the finished
    rows cost: reading them, Ray loading and sorting the checkpoint, filtering.
(b) `resume_memory`: peak RSS during those runs, sampled every 0.2 s with psutil over the
    job's session, by role (the driver; Ray workers by their `ray::` process title:
    input read tasks, Parquet read tasks (Ray's checkpoint load, and the metrics pass over
    the output), the checkpoint sort task, the checkpoint filter actor...). A worker process
    is reused across tasks, so a role's peak is the largest RSS seen while a process
    carried that title.
(c) `crash`: rows paid for twice per crash, from the crash harness of tests/test_crashes.py
    (`raycls.testing.crashes.crash_series`), killing a 300-row job with SIGKILL, SIGINT and
    SIGKILL to the process group.

Jobs run with a Ray of their own (`own_ray_env`): no RAY_ADDRESS, a private Ray temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from raycls.testing.bench import fresh_response_cache  # noqa: E402

fresh_response_cache()

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from raycls.testing.crashes import (  # noqa: E402
    CRASH_LABELS, KILLS, AttemptOracle, crash_rows, crash_series, output_rows, own_ray_env, start_job,
)
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig  # noqa: E402

LABELS = ["negative", "positive"]
ROWS_PER_FILE = 100_000


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def write_input(directory: Path, finished: int, unfinished: int) -> None:
    """`part-NNN.parquet` files of the finished rows, `zz-new.parquet` of the unfinished ones."""
    directory.mkdir(parents=True)

    def table(start: int, stop: int) -> pa.Table:
        ids = [f"r{i}" for i in range(start, stop)]
        return pa.table({"rid": ids, "text": [f"row {r}: the room was {'clean' if int(r[1:]) % 2 else 'dirty'}" for r in ids]})

    for n, start in enumerate(range(0, finished, ROWS_PER_FILE)):
        pq.write_table(table(start, min(finished, start + ROWS_PER_FILE)), directory / f"part-{n:03d}.parquet")
    pq.write_table(table(finished, finished + unfinished), directory / "zz-new.parquet")


def job_spec(input_path: str, output: Path, base_url: str, key_file: Path) -> dict:
    return {
        "input": {"path": input_path, "id_column": "rid"},
        "labels": LABELS,
        "output": {"path": str(output)},
        "backend": {"kind": "openai", "base_url": base_url, "model": "fake-model", "api_keys": [f"file:{key_file}"],
                    "rpm": 1_000_000, "tpm": 1_000_000_000, "max_concurrency": 16},
    }


def build_checkpoint(spec: dict, scratch: Path) -> float:
    """Ray's own checkpoint of every finished row: read them with the job's datasource (so the
    ids are the job's) and write them with Ray's checkpointing on; seconds taken."""
    import ray
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    from raycls.config import parse_spec
    from raycls.inputs.datasource import InputDatasource, resolve_input

    started = time.monotonic()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        parsed = parse_spec(spec)
        ds = ray.data.read_datasource(InputDatasource(parsed.input, resolve_input(parsed.input)))
        ds.context.checkpoint_config = CheckpointConfig(
            id_column="id", checkpoint_path=parsed.checkpoint_path, delete_checkpoint_on_success=False)
        ds.write_parquet(str(scratch))
    finally:
        ray.shutdown()
    return time.monotonic() - started


def write_checkpoint_files(spec: dict, finished: int, ids_per_file: int) -> int:
    """The committed checkpoint a raycls run leaves after labelling the finished rows, written
    the way Ray's `BatchBasedCheckpointWriter` writes it: one Parquet file per write task,
    `<dataset>_<write uuid>_<task index>.parquet`, holding one string column `id`. In a raycls
    run a write task carries one API batch, so `ids_per_file` is `backend.batch_size` (64).
    Much faster than running ~15,000 write tasks here; the resumed run then shows that Ray
    accepts them (it asks the server for the unfinished rows only). Returns the file count."""
    from raycls.config import parse_spec

    ckpt = Path(parse_spec(spec).checkpoint_path)
    ckpt.mkdir(parents=True)
    dataset, write = uuid.uuid4().hex[:22], uuid.uuid4().hex
    files = 0
    for task, start in enumerate(range(0, finished, ids_per_file)):
        ids = pa.array([f"r{i}" for i in range(start, min(finished, start + ids_per_file))], pa.string())
        pq.write_table(pa.table({"id": ids}), ckpt / f"{dataset}_{write}_{task:06d}.parquet")
        files += 1
    return files


def _role(proc: psutil.Process, driver: int) -> str | None:
    if proc.pid == driver:
        return "driver"
    title = " ".join(proc.cmdline())
    if not title.startswith("ray::"):
        return None
    name = title[5:].split(" ")[0]
    for key, role in (("CheckpointFilter", "checkpoint_filter_actor"), ("convert_and_sort", "checkpoint_sort_task"),
                      ("ReadRayclsInput", "input_read_task"), ("ReadParquet", "parquet_read_task"),
                      ("ReadFiles", "parquet_read_task"), ("ApiCaller", "api_caller_actor"), ("Write", "write_task")):
        if key in name:
            return role
    return None


def run_sampled(config: Path, log: Path, env: dict[str, str]) -> dict:
    """Run the job to its end; wall time, exit code, and peak RSS (MiB) by role."""
    started = time.monotonic()
    proc = start_job(config, yaml.safe_load(config.read_text())["output"]["path"], log, env=env)
    peaks: dict[str, float] = {}
    while proc.poll() is None:
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) != proc.pid:  # Ray workers lead process groups of their own
                    continue
                role = _role(p, proc.pid)
                if role:
                    peaks[role] = max(peaks.get(role, 0.0), p.memory_info().rss / 2**20)
            except (psutil.Error, ProcessLookupError, OSError):
                continue
        time.sleep(0.2)
    text = log.read_text(errors="replace")
    loaded = re.search(r"Checkpoint loaded for \w+ in ([\d.]+) seconds\. SizeBytes = (\d+)", text)
    executed = re.findall(r"execution finished in ([\d.]+) seconds", text)
    return {"exit_code": proc.returncode, "wall_s": round(time.monotonic() - started, 1),
            "checkpoint_load_s": float(loaded.group(1)) if loaded else None,
            "checkpoint_bytes": int(loaded.group(2)) if loaded else None,
            "label_pipeline_s": float(executed[0]) if executed else None,
            "peak_rss_mib": {k: round(v) for k, v in sorted(peaks.items())}}


def resume_scale(root: Path, finished: int, unfinished: int, ids_per_file: int, ray_tmp: str) -> None:
    write_input(root / "in", finished, unfinished)
    (root / "keys.txt").write_text("sk-bench\n")
    env = own_ray_env(ray_tmp)
    os.environ.update({"RAY_TMPDIR": ray_tmp})
    os.environ.pop("RAY_ADDRESS", None)
    with FakeOpenAI(FakeOpenAIConfig(keys=["sk-bench"], labels=LABELS, latency_ms=5)) as server:
        resumed = job_spec(str(root / "in"), root / "resumed", server.base_url, root / "keys.txt")
        started = time.monotonic()
        if ids_per_file:
            write_checkpoint_files(resumed, finished, ids_per_file)
        else:
            build_checkpoint({**resumed, "input": {**resumed["input"], "path": str(root / "in" / "part-*.parquet")}},
                             root / "scratch")
        ckpt = root / "resumed" / "_checkpoint"
        emit(figure="checkpoint_built", how="files" if ids_per_file else "ray_pipeline", finished_ids=finished,
             seconds=round(time.monotonic() - started, 1),
             files=len(list(ckpt.glob("*.parquet"))), bytes=sum(p.stat().st_size for p in ckpt.glob("*.parquet")))
        fresh = job_spec(str(root / "in" / "zz-new.parquet"), root / "fresh", server.base_url, root / "keys.txt")
        for name, spec in (("fresh", fresh), ("resumed", resumed)):
            config = root / f"{name}.yaml"
            config.write_text(yaml.safe_dump(spec))
            result = run_sampled(config, root / f"{name}.log", env)
            written = len(output_rows(Path(spec["output"]["path"])))
            asked = server.stats().keys["sk-bench"].accepted
            server.reset_stats()
            emit(figure="resume_overhead" if name == "resumed" else "no_checkpoint_baseline", run=name,
                 input_rows=finished + unfinished if name == "resumed" else unfinished,
                 checkpointed_ids=finished if name == "resumed" else 0, rows_written=written, requests=asked, **result)


def crash_figures(root: Path, crashes: int, seed: int, ray_tmp: str) -> None:
    rows = 300
    root.mkdir(parents=True)
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in crash_rows(rows)))
    (root / "keys.txt").write_text("sk-crash\n")
    oracle = AttemptOracle()
    rng = random.Random(seed)
    kills = (rng.sample(sorted(KILLS), len(KILLS)) * crashes)[:crashes]
    config = FakeOpenAIConfig(keys=["sk-crash"], labels=CRASH_LABELS, latency_ms=250, oracle=oracle, seed=seed)
    with FakeOpenAI(config) as server:
        spec = {"input": {"path": str(root / "in.jsonl"), "id_column": "rid"}, "labels": CRASH_LABELS,
                "output": {"path": str(root / "out")},
                "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model",
                            "api_keys": [f"file:{root / 'keys.txt'}"], "rpm": 100_000, "tpm": 100_000_000,
                            "batch_size": 10, "actors": 1, "max_concurrency": 4}}
        (root / "job.yaml").write_text(yaml.safe_dump(spec))
        env = own_ray_env(ray_tmp)
        series, final = crash_series(lambda: start_job(root / "job.yaml", root / "out", root / "job.log", env=env),
                                     root / "out", kills, rows, rng, oracle)
    for n, crash in enumerate(series):
        emit(figure="crash", n=n, kill=crash.attempt.kill, seconds=round(crash.attempt.seconds, 1),
             stop_s=round(crash.attempt.stop_s, 1) if crash.attempt.stop_s is not None else None,
             exit_code=crash.attempt.exit_code, committed_before=crash.attempt.rows_before,
             committed_after=len(crash.committed), requests=len(oracle.asked(n)), rows_asked=crash.asked,
             rows_redone=crash.redone)
    ids = [r["id"] for r in output_rows(root / "out")]
    emit(figure="crash_final", rows=rows, rows_out=len(ids), unique_ids=len(set(ids)), exit_code=final.exit_code,
         seconds=round(final.seconds, 1), requests=len(oracle.asked(len(series))),
         rows_asked=len(set(oracle.asked(len(series)))), total_requests=len(oracle.seen),
         requests_beyond_one_per_row=len(oracle.seen) - rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--unfinished", type=int, default=100)
    parser.add_argument("--ids-per-file", type=int, default=64,
                        help="checkpoint ids per file: a raycls run writes one file per batch, "
                             "backend.batch_size (64 by default); 0: build the checkpoint with a Ray pipeline")
    parser.add_argument("--crashes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--skip", choices=["scale", "crash"], action="append", default=[])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="raycls-resume-bench-"))
    ray_tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    emit(figure="machine", cpus=os.cpu_count(), load_1m=round(os.getloadavg()[0], 1),
         memory_gib=round(psutil.virtual_memory().total / 2**30, 1), workdir=str(root))
    try:
        if "scale" not in args.skip:
            resume_scale(root / "scale", args.finished, args.unfinished, args.ids_per_file, ray_tmp)
        if "crash" not in args.skip and args.crashes:
            crash_figures(root / "crash", args.crashes, args.seed, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
