"""Rows out = rows in, checked by the job itself: a run with lost rows is never marked finished,
and the next run completes it with every row exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from raycls import schema
from raycls.errors import BackendError, RowCountError
from raycls.job.pipeline import run_job
from raycls.job.resume import MANIFEST_FILE
from raycls.job.rowcheck import check_rows
from raycls.testing.crashes import own_ray_env
from raycls.testing.faults import INJECTED
from tests.conftest import REPO, api_spec, review_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

KEYS = ["sk-inv-A"]


def ids_ds(ids):
    return ray.data.from_items([{schema.ID: i} for i in ids], override_num_blocks=3)


def written_ids(output: str) -> list[str]:
    return pq.read_table(f"{output}/data", columns=[schema.ID]).column(schema.ID).to_pylist()


def manifest(output: str) -> dict:
    return json.loads(Path(output, MANIFEST_FILE).read_text())


# -- the check itself ------------------------------------------------------------------------


def test_equal_id_sets_pass_and_give_the_row_count(ray_local):
    ids = [f"f.jsonl:{i}" for i in range(500)]
    assert check_rows(ids_ds(ids), ids_ds(list(reversed(ids)))) == 500


def test_missing_rows_are_named(ray_local):
    ids = [f"f.jsonl:{i}" for i in range(500)]
    with pytest.raises(RowCountError) as err:
        check_rows(ids_ds(ids), ids_ds(ids[:490]))
    assert err.value.missing == sorted(ids[490:]) and not err.value.extra and not err.value.repeated
    assert "read 500, written 490" in str(err.value) and "10 missing" in str(err.value)


def test_a_row_written_twice_is_named_even_when_the_count_matches(ray_local):
    ids = [f"f.jsonl:{i}" for i in range(200)]
    with pytest.raises(RowCountError) as err:
        check_rows(ids_ds(ids), ids_ds(ids[:-1] + [ids[0]]))
    assert err.value.missing == [ids[-1]] and err.value.repeated == [ids[0]]


def test_rows_not_in_the_input_are_named(ray_local):
    ids = [f"f.jsonl:{i}" for i in range(50)]
    with pytest.raises(RowCountError) as err:
        check_rows(ids_ds(ids), ids_ds(ids + ["elsewhere:1"]))
    assert err.value.extra == ["elsewhere:1"]


# -- on real runs -----------------------------------------------------------------------------


def test_metrics_hold_rows_read_beside_rows_written(tmp_path, ray_local, fake_openai):
    server = fake_openai(keys=KEYS, labels=["negative", "positive"])
    result = run_job(api_spec(tmp_path, server.base_url, review_rows(30), KEYS))
    metrics = json.loads(Path(result.output_path, "metrics.json").read_text())
    assert metrics["rows_read"] == metrics["rows_written"] == 30


def test_a_run_whose_budget_actor_dies_is_not_finished_and_the_next_run_completes_it(tmp_path, ray_local, fake_openai):
    server = fake_openai(keys=KEYS, labels=["negative", "positive"], latency_ms=30)
    rows = review_rows(200)
    spec = api_spec(tmp_path, server.base_url, rows, KEYS, rpm=100_000, tpm=10_000_000,
                    max_concurrency=4, batch_size=10)
    killed = threading.Event()

    def kill_budget_actor_after_some_requests() -> None:
        deadline = time.monotonic() + 300
        while not killed.is_set() and time.monotonic() < deadline:
            if server.stats().keys[KEYS[0]].accepted >= 20:
                for name in ray.util.list_named_actors():
                    if name.startswith("raycls-budget-"):
                        ray.kill(ray.get_actor(name))
                        killed.set()
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_budget_actor_after_some_requests, daemon=True)
    watcher.start()
    with pytest.raises((BackendError, RowCountError)):
        run_job(spec)
    assert killed.is_set()
    assert not manifest(spec.output.path)["finished"]
    assert not Path(spec.output.path, "metrics.json").exists()

    run_job(spec)  # the same job again: labels what the first one did not write
    ids = written_ids(spec.output.path)
    assert sorted(ids) == sorted(f"in.jsonl:{i}" for i in range(len(rows)))
    assert manifest(spec.output.path)["finished"]


def test_an_unexpected_error_in_a_caller_fails_the_run_instead_of_failing_rows(tmp_path, ray_local, fake_openai):
    """A bug (here: reading the answer raises RuntimeError in every caller) is not retried into
    `api_error` rows: the run fails loudly, unfinished, and a fixed run labels every row once."""
    server = fake_openai(keys=KEYS, labels=["negative", "positive"])
    spec = api_spec(tmp_path, server.base_url, review_rows(40), KEYS, max_retries=3)
    config = tmp_path / "job.json"
    config.write_text(json.dumps(spec.model_dump(mode="json")))
    driver = (
        "import sys, ray; "
        "ray.init(num_cpus=4, include_dashboard=False, "
        "runtime_env={'worker_process_setup_hook': 'raycls.testing.faults.break_answer_reading'}); "
        "from raycls.cli import main; sys.exit(main(['run', '--config', sys.argv[1]]))"
    )
    ray_tmp = tmp_path.parent / "rt"
    proc = subprocess.run([sys.executable, "-c", driver, str(config)], cwd=REPO, env=own_ray_env(ray_tmp),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert INJECTED in proc.stderr
    assert server.stats().keys[KEYS[0]].accepted <= 40  # one request per row at most: the bug was not retried
    assert not manifest(spec.output.path)["finished"]

    run_job(spec)
    assert sorted(written_ids(spec.output.path)) == sorted(f"in.jsonl:{i}" for i in range(40))
    out = pq.read_table(f"{spec.output.path}/data").to_pylist()
    assert not any(r[schema.ERROR] == schema.API_ERROR for r in out)


def budget_actors_alive() -> list[str]:
    return [n for n in ray.util.list_named_actors() if n.startswith("raycls-budget-")]


def test_a_run_that_fails_releases_its_budget_actor(tmp_path, ray_local, fake_openai):
    """`Backend.close` runs in a `finally`: the last key revoked mid-run fails the run, and the
    budget actor the run started is gone with it."""
    server = fake_openai(keys=KEYS, labels=["negative", "positive"], latency_ms=20)
    spec = api_spec(tmp_path, server.base_url, review_rows(120), KEYS, rpm=600, max_concurrency=2, batch_size=10)
    before = set(budget_actors_alive())
    revoked = threading.Event()

    def revoke_after_some_requests() -> None:
        deadline = time.monotonic() + 300
        while not revoked.is_set() and time.monotonic() < deadline:
            if server.stats().keys[KEYS[0]].accepted >= 10:
                server.revoke(KEYS[0])
                revoked.set()
            time.sleep(0.02)

    threading.Thread(target=revoke_after_some_requests, daemon=True).start()
    with pytest.raises(BackendError):
        run_job(spec)
    assert revoked.is_set()
    assert set(budget_actors_alive()) == before
    assert not manifest(spec.output.path)["finished"]
