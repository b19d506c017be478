"""Kill real labelling jobs and resume them: every row ends in the output exactly once.

`python jobs/classify.py` runs as a subprocess, as a user starts it, against the fake
OpenAI server in this process (127.0.0.1, with latency, so a job labels for ~20 s). The
series (`raycls.testing.crashes.crash_series`) kills it with SIGKILL (the driver alone),
SIGINT (Ctrl-C: the whole foreground group) and SIGKILL to the whole group (close to the
machine going away; Ray's workers lead process groups of their own and die with their
raylet), in a seeded random order at seeded random points, then runs it to the end.
The server's oracle answers row i of attempt a with label (i + a) mod 6, so the final
output shows which attempt labelled each row. `pytest -s` prints the per-crash figures.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile

import pytest
import yaml

from raycls.job.pipeline import MIN_LOCAL_CPUS
from raycls.testing.crashes import (
    CRASH_LABELS, KILLS, AttemptOracle, crash_rows, crash_series, label_for, output_rows, own_ray_env, start_job,
)
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

SEED = 20261123
ROWS = 300
BATCH_SIZE, ACTORS, CONCURRENCY = 10, 1, 4
LATENCY_MS = 250
"""With CONCURRENCY requests at a time, ROWS rows take ~20 s of labelling in all."""
IN_FLIGHT_BATCHES = 4
"""`max_tasks_in_flight_per_actor` of the API caller pool (raycls.backends.api.backend)."""
REDONE_BOUND = (IN_FLIGHT_BATCHES * ACTORS + MIN_LOCAL_CPUS) * BATCH_SIZE
"""Most rows a crash can make us pay for twice. A row is committed with its write task's
block: labelled rows not yet committed are in a caller actor's batches (at most
IN_FLIGHT_BATCHES per actor, each of BATCH_SIZE rows, answered or waiting on the server),
or in blocks at the write stage (1-CPU tasks, so at most MIN_LOCAL_CPUS logical CPUs'
worth at once on the job's own Ray). Finished blocks waiting for a write task would add
to this; with writes taking milliseconds and batches seconds, they do not pile up."""


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Three kills in a row (each kind once, in a seeded order), then a run to the end."""
    root = tmp_path_factory.mktemp("crashes")
    rows = crash_rows(ROWS)
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "keys.txt").write_text("sk-crash\n")
    oracle = AttemptOracle()
    config = FakeOpenAIConfig(keys=["sk-crash"], labels=CRASH_LABELS, latency_ms=LATENCY_MS, oracle=oracle, seed=SEED)
    rng = random.Random(SEED)
    kills = rng.sample(sorted(KILLS), len(KILLS))
    ray_tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths live under it
    out, log = root / "out", root / "job.log"
    try:
        with FakeOpenAI(config) as server:
            spec = {
                "input": {"path": str(root / "in.jsonl"), "id_column": "rid"},
                "labels": CRASH_LABELS,
                "output": {"path": str(out)},
                "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model",
                            "api_keys": [f"file:{root / 'keys.txt'}"], "rpm": 100_000, "tpm": 100_000_000,
                            "batch_size": BATCH_SIZE, "actors": ACTORS, "max_concurrency": CONCURRENCY},
            }
            (root / "job.yaml").write_text(yaml.safe_dump(spec))
            env = own_ray_env(ray_tmp)
            crashes, final = crash_series(lambda: start_job(root / "job.yaml", out, log, env=env),
                                          out, kills, ROWS, rng, oracle)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for n, crash in enumerate(crashes):
        a = crash.attempt
        stop = f"{a.stop_s:.1f} s" if a.stop_s is not None else "-"
        print(f"crash {n} {a.kill or 'none (finished first)'}: after {a.seconds:.1f} s, stopped in {stop}, exit {a.exit_code}, "
              f"committed {a.rows_before} -> {len(crash.committed)}, asked {crash.asked}, redone {crash.redone}")
    print(f"final: {final.seconds:.1f} s, exit {final.exit_code}, rows {final.rows_after}, bound {REDONE_BOUND}")
    return {"rows": rows, "out": out, "log": log, "crashes": crashes, "final": final, "kills": kills}


def test_every_attempt_but_the_last_was_killed_mid_run(series):
    assert [c.attempt.kill for c in series["crashes"]] == series["kills"]
    assert {c.attempt.kill for c in series["crashes"]} == set(KILLS)
    assert all(len(c.committed) < ROWS for c in series["crashes"])


def test_a_sigint_stops_the_job_without_a_sigkill(series):
    """Ctrl-C must end the job on its own: the harness escalates to SIGKILL only after 120 s."""
    codes = [c.attempt.exit_code for c in series["crashes"] if c.attempt.kill == "SIGINT"]
    assert codes and all(code != -9 for code in codes)


def test_the_resumed_run_finishes(series):
    assert series["final"].exit_code == 0, series["log"].read_text()[-3000:]


def test_every_input_row_is_in_the_output_exactly_once(series):
    ids = [row["id"] for row in output_rows(series["out"])]
    assert len(ids) == len(set(ids))
    assert set(ids) == {row["rid"] for row in series["rows"]}


def test_rows_committed_before_a_crash_keep_their_label(series):
    final = {row["id"]: row["label"] for row in output_rows(series["out"])}
    for n, crash in enumerate(series["crashes"]):
        changed = {rid for rid, label in crash.committed.items() if final.get(rid) != label}
        assert not changed, f"crash {n}: {len(changed)} committed rows were labelled again"


def test_every_row_was_labelled_by_one_attempt(series):
    attempts = len(series["crashes"]) + 1
    rows = output_rows(series["out"])
    assert all(row["label"] in {label_for(row["id"], a) for a in range(attempts)} for row in rows)


def test_the_final_metrics_count_every_input_row(series):
    metrics = json.loads((series["out"] / "metrics.json").read_text())
    assert metrics["rows_written"] == ROWS
    assert metrics["rows_labeled"] == ROWS


def test_work_redone_per_crash_is_bounded(series):
    redone = [c.redone for c in series["crashes"]]
    assert all(r <= REDONE_BOUND for r in redone), f"rows redone per crash {redone}, bound {REDONE_BOUND}"
