"""A real two-node Ray cluster on this machine: `ray job submit`, and a worker node lost mid-job.

Two `ray start`s (a head with 2 CPUs, a worker with 3 CPUs and a `worker_node` resource),
each with its own temp dir and free ports (`raycls.testing.local_cluster`): jobs go in
through the job API with `--working-dir`, as on a cloud cluster, and label rows through
the fake OpenAI-compatible server on 127.0.0.1 (keys in a file both nodes can read).

Then the worker node is SIGKILLed (raylet, agents, workers: every process of its session)
while a job is labelling, as a lost spot instance dies, and a replacement node joins. The
job's one caller actor asks for more CPUs than the head has, so it runs on the worker
when the node dies, every time. The job must end with every row exactly once: by itself
(Ray restarts the caller on the replacement, retries the tasks and rebuilds lost blocks;
the key budgets and the response cache live on the driver's node) or, if it fails, by running the same command
again, which resumes from the checkpoint; a failed attempt must leave the output unfinished.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

LABELS = ["negative", "positive"]
KEYS = ["sk-2n-a", "sk-2n-b"]
FIRST_ROWS = 120
KILL_ROWS = 200
WORKER_CPUS = 3
CALLER_CPUS = 2.5
"""More than the head's 2 CPUs and no more than a worker's: the killed job's caller can only run on a worker."""
SUBMIT_TIMEOUT_S = 480
"""Per submission; a job takes ~1 min on an idle 2-core machine, several when it is shared."""


def _rows(n: int, prefix: str) -> list[dict[str, str]]:
    return [{"id": f"{prefix}-{i:04d}", "text": f"review {i}: the room was {'clean and quiet' if i % 2 else 'dirty and loud'}",
             "label": LABELS[i % 2]} for i in range(n)]


def _write_job(directory: Path, rows: list[dict[str, str]], base_url: str, cache_actors: int = 1, **backend: Any) -> Path:
    """Input JSONL, a key file and a spec YAML under `directory`; returns the spec path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    keys = directory / "keys.txt"
    keys.write_text("\n".join(KEYS) + "\n")
    spec = {
        "input": {"path": str(data), "id_column": "id", "gold_column": "label"},
        "labels": LABELS,
        "output": {"path": str(directory / "out")},
        "backend": {"kind": "openai", "base_url": base_url, "model": "fake-model",
                    "api_keys": [f"file:{keys}"], "timeout_s": 10, **backend},
        "cache": {"actors": cache_actors},
    }
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _submit_cmd(cluster, spec: Path, submission_id: str) -> list[str]:
    """`ray job submit --working-dir <repo>`: the job runs from the uploaded copy of the repo."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    return [ray_cli, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
            "--working-dir", str(REPO), "--", sys.executable, "jobs/classify.py", "--config", str(spec)]


def _submit(cluster, spec: Path, submission_id: str, log: Path) -> int | None:
    """Run `ray job submit` to the end; its exit status (None: it ran past SUBMIT_TIMEOUT_S)."""
    from raycls.testing.local_cluster import ray_env

    with open(log, "w") as out:
        proc = subprocess.Popen(_submit_cmd(cluster, spec, submission_id), env=ray_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=SUBMIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            _stop_job(cluster, submission_id)
            return None


def _stop_job(cluster, submission_id: str) -> None:
    """Stop a job that outlived its `ray job submit` (so a retry does not meet it at the lease)."""
    from raycls.testing.local_cluster import ray_env

    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "job", "stop", "--address", cluster.dashboard_url, submission_id], env=ray_env(),
                   capture_output=True, timeout=120)


def _output_ids(out: Path) -> list[str]:
    return pq.read_table(out / "data", columns=["id"]).column("id").to_pylist()


def _job_id(cluster, submission_id: str) -> str:
    from ray.util.state import list_jobs

    jobs = [j for j in list_jobs(address=cluster.dashboard_url) if j.submission_id == submission_id]
    assert jobs and jobs[0].job_id, f"job {submission_id} not found in the cluster's job table"
    return jobs[0].job_id


@pytest.fixture(scope="module")
def fake_api():
    """One fake provider for the module: answers within the label set, ~50 ms per request."""
    from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

    server = FakeOpenAI(FakeOpenAIConfig(keys=KEYS, labels=LABELS, latency_ms=50))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster():
    """A head (2 CPUs) and a worker node (3 CPUs, resource `worker_node`), stopped at the end."""
    from raycls.testing.local_cluster import LocalCluster

    started = time.monotonic()
    c = LocalCluster.start(head_cpus=2)
    try:
        c.add_worker(num_cpus=WORKER_CPUS, resources={"worker_node": 1})
        c.start_s = time.monotonic() - started  # type: ignore[attr-defined]
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def first_job(cluster, fake_api, tmp_path_factory):
    """One job submitted to the healthy two-node cluster, run to the end."""
    directory = tmp_path_factory.mktemp("first")
    spec = _write_job(directory, _rows(FIRST_ROWS, "first"), fake_api.base_url, cache_actors=4, actors=2, batch_size=10,
                      max_concurrency=8)
    started = time.monotonic()
    rc = _submit(cluster, spec, "raycls-2n-first", directory / "submit.log")
    return {"rc": rc, "log": (directory / "submit.log").read_text(errors="replace"), "out": directory / "out",
            "elapsed_s": time.monotonic() - started, "job_id": _job_id(cluster, "raycls-2n-first")}


def test_job_submitted_with_working_dir_succeeds(first_job):
    assert first_job["rc"] == 0, first_job["log"][-4000:]


def test_every_input_row_is_written_exactly_once(first_job):
    ids = _output_ids(first_job["out"])
    assert sorted(ids) == sorted(r["id"] for r in _rows(FIRST_ROWS, "first"))


def test_metrics_cover_every_row(first_job):
    metrics = json.loads((first_job["out"] / "metrics.json").read_text())
    assert (metrics["rows_written"], metrics["rows_labeled"], metrics["rows_failed"]) == (FIRST_ROWS, FIRST_ROWS, 0)


def test_job_tasks_ran_on_the_worker_node(cluster, first_job):
    """Ray Data spread the job's tasks and actors over both nodes, not only the head."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=cluster.dashboard_url, filters=[("job_id", "=", first_job["job_id"])], limit=10_000)
    worker = cluster.nodes[1].node_id
    on_worker = {t.name for t in tasks if t.node_id == worker}
    assert any("prepare_batch" in n or "ApiCaller" in n or "Write" in n for n in on_worker), sorted(on_worker)


def test_budget_actor_lives_on_the_drivers_node(cluster, first_job):
    """The key budgets sit beside the driver (the head, for a submitted job), not on a worker that may go."""
    from ray.util.state import list_actors

    budgets = [a for a in list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "BudgetService")], limit=1000)
               if a.job_id == first_job["job_id"]]
    assert budgets and {a.node_id for a in budgets} == {cluster.head.node_id}


def test_cache_actors_live_on_the_drivers_node(cluster, first_job):
    """The response cache (on by default) holds the rows parked on a leader: a lost worker must not take it along."""
    from ray.util.state import list_actors

    shards = [a for a in list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "CacheShard")], limit=1000)
              if a.job_id == first_job["job_id"]]
    assert shards and {a.node_id for a in shards} == {cluster.head.node_id}


# --- a worker node lost mid-job ---------------------------------------------------------------


def _caller_on(cluster, node_id: str) -> bool:
    from ray.util.state import list_actors

    try:
        actors = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    except Exception:
        return False
    return any("ApiCaller" in a.class_name and a.node_id == node_id for a in actors)


def _manifest_finished(out: Path) -> bool:
    manifest = out / "_raycls_run.json"
    return manifest.exists() and bool(json.loads(manifest.read_text()).get("finished"))


@pytest.fixture(scope="module")
def killed_job(cluster, fake_api, first_job, tmp_path_factory):
    """A job whose only caller runs on the worker node, SIGKILLed once rows are being written;
    a replacement node (same size) then joins, as a lost spot instance is replaced. If the job
    fails, the same command is submitted again (a resume). Runs after `first_job` (one job at a time)."""
    from raycls.testing.local_cluster import ray_env

    directory = tmp_path_factory.mktemp("killed")
    # rpm paces the job to ~10 requests/s over both keys: labelling lasts ~20 s, long enough to strike mid-run.
    spec = _write_job(directory, _rows(KILL_ROWS, "kill"), fake_api.base_url, cache_actors=4, actors=1, num_cpus=CALLER_CPUS,
                      batch_size=10, max_concurrency=4, rpm=300)
    out = directory / "out"
    worker = cluster.nodes[1]
    started = time.monotonic()
    log = open(directory / "submit-1.log", "w")
    proc = subprocess.Popen(_submit_cmd(cluster, spec, "raycls-2n-kill-1"), env=ray_env(), stdout=log, stderr=subprocess.STDOUT)
    state: dict[str, Any] = {}
    try:
        # Poll until rows are being written (the caller is then alive, on the worker by its size).
        while proc.poll() is None and time.monotonic() - started < SUBMIT_TIMEOUT_S:
            written = list((out / "data").glob("*.parquet")) if (out / "data").exists() else []
            if written:
                state = {"files_at_kill": len(written), "caller_on_worker_at_kill": _caller_on(cluster, worker.node_id),
                         "finished_at_kill": _manifest_finished(out), "killed_processes": worker.kill(),
                         "killed_after_s": time.monotonic() - started}
                cluster.add_worker(num_cpus=WORKER_CPUS, resources={"worker_node": 1})
                break
            time.sleep(0.5)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, SUBMIT_TIMEOUT_S - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            rc = None
            _stop_job(cluster, "raycls-2n-kill-1")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    attempts = [rc]
    state["finished_after_first_attempt"] = _manifest_finished(out)
    if rc != 0:  # the run failed with the node: the same command again must resume it
        attempts.append(_submit(cluster, spec, "raycls-2n-kill-2", directory / "submit-2.log"))
    (directory / "kill.json").write_text(json.dumps({**state, "attempts": attempts}))  # for a person reading a failure
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(directory.glob("submit-*.log")))
    return {**state, "attempts": attempts, "out": out, "logs": logs, "elapsed_s": time.monotonic() - started}


def test_worker_node_was_killed_mid_job(cluster, killed_job):
    """The fault really happened while the job was running: some rows written, the output unfinished."""
    from ray.util.state import list_nodes

    assert killed_job.get("killed_processes", 0) > 0, killed_job["logs"]
    assert killed_job["files_at_kill"] > 0 and killed_job["finished_at_kill"] is False
    states = {n.node_id: n.state for n in list_nodes(address=cluster.dashboard_url)}
    assert states[cluster.nodes[1].node_id] == "DEAD"


def test_the_killed_node_was_running_the_jobs_caller(killed_job):
    """The case that matters: the actor holding requests in flight dies with the node."""
    assert killed_job["caller_on_worker_at_kill"] is True, killed_job["logs"]


def test_job_survives_the_lost_node_or_one_resubmission_finishes_it(killed_job):
    assert killed_job["attempts"][-1] == 0 and len(killed_job["attempts"]) <= 2, killed_job["logs"]


def test_an_attempt_that_failed_with_the_node_left_the_output_unfinished(killed_job):
    """Whichever way the first attempt ended, the manifest says so: finished only if it succeeded."""
    assert killed_job["finished_after_first_attempt"] is (killed_job["attempts"][0] == 0), killed_job["logs"]


def test_every_row_written_exactly_once_after_the_lost_node(killed_job):
    ids = _output_ids(killed_job["out"])
    assert len(ids) == len(set(ids)), "some rows were written twice"
    assert set(ids) == {r["id"] for r in _rows(KILL_ROWS, "kill")}


def test_metrics_after_the_lost_node_count_every_row_once(killed_job):
    metrics = json.loads((killed_job["out"] / "metrics.json").read_text())
    assert metrics["rows_written"] == KILL_ROWS and metrics["rows_failed"] == 0
