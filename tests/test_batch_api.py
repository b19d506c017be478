"""Batch mode end to end: real local Ray, the fault-injection server's Batch API over a real socket.

Each job labels a few dozen rows; batches advance one state per retrieval (no sleeps),
and `poll_interval_s` is tiny, so a job takes a few passes of Ray Data, not minutes.
"""

from __future__ import annotations

import json

import openai
import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.backends.api.batch_state import BatchState
from raycls.job.pipeline import run_job
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig
from tests.conftest import UNPACED, api_spec, review_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

KEYS = ["sk-batch-A", "sk-batch-B"]
LABELS = ["negative", "positive"]
ROWS = review_rows(24)
BATCH = {"mode": "batch", "poll_interval_s": 0.01, "batch_max_requests": 10}


def oracle(prompt: str) -> str:
    return "positive" if "clean and quiet" in prompt.rsplit("review", 1)[-1] else "negative"


def server(**batch) -> FakeOpenAI:
    return FakeOpenAI(FakeOpenAIConfig(keys=KEYS, labels=LABELS, oracle=oracle, batch=batch))


def spec_for(tmp_path, base_url, cache=None, **backend):
    spec = api_spec(tmp_path, base_url, ROWS, KEYS, **{**BATCH, **backend})
    if cache:
        spec = spec.model_copy(update={"cache": spec.cache.model_copy(update={"path": str(cache)})})
    return spec


def written(out) -> list[dict]:
    return pq.read_table(f"{out}/data").to_pylist()


def test_the_fake_batch_api_speaks_the_official_client(tmp_path):
    with server(steps_per_state=1) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key=KEYS[0], max_retries=0)
        lines = [{"custom_id": f"r{i}#0", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "fake-model", "messages": [{"role": "user", "content": f"review {i}: clean and quiet"}],
                           "max_tokens": 4}} for i in range(3)]
        path = tmp_path / "in.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        file = c.files.create(file=path.open("rb"), purpose="batch")
        batch = c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.status == "validating"
        seen = [c.batches.retrieve(batch.id).status for _ in range(3)]
        assert seen == ["in_progress", "finalizing", "completed"]
        done = c.batches.retrieve(batch.id)
        assert done.request_counts.completed == 3
        out = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
        assert sorted(x["custom_id"] for x in out) == ["r0#0", "r1#0", "r2#0"]
        assert {x["response"]["body"]["choices"][0]["message"]["content"] for x in out} == {"positive"}
        other = c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert c.batches.cancel(other.id).status == "cancelling"
        assert c.batches.retrieve(other.id).status == "cancelled"
        assert {b.id for b in c.batches.list()} == {batch.id, other.id}
        assert srv.batches.counters().uploads == 1 and srv.batches.counters().cancels == 1


def test_the_fake_batch_api_takes_a_file_of_many_megabytes(tmp_path):
    """A real batch file is tens of MB (50,000 requests): the fake must judge it by its own
    limit (`max_bytes`), not refuse it at its HTTP layer."""
    line = {"custom_id": "", "method": "POST", "url": "/v1/completions",
            "body": {"model": "fake-model", "prompt": "review: clean and quiet " * 40, "max_tokens": 4}}
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({**line, "custom_id": f"r{i}#0"}) + "\n" for i in range(3000)))
    assert 3 * 2**20 < path.stat().st_size < 4 * 2**20
    with server(max_bytes=3 * 2**20) as small, server() as default:
        refused = openai.OpenAI(base_url=small.base_url, api_key=KEYS[0], max_retries=0)
        with pytest.raises(openai.BadRequestError, match="over the limit"):
            refused.files.create(file=path.open("rb"), purpose="batch")
        c = openai.OpenAI(base_url=default.base_url, api_key=KEYS[0], max_retries=0)
        file = c.files.create(file=path.open("rb"), purpose="batch")
        batch = c.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
        assert batch.status == "validating" and default.batches.counters().uploads == 1


def test_batch_labels_equal_the_sync_labels_and_cost_half(tmp_path, ray_local, monkeypatch):
    with server() as srv:
        (tmp_path / "s").mkdir()
        (tmp_path / "b").mkdir()
        sync = run_job(api_spec(tmp_path / "s", srv.base_url, ROWS, KEYS, price_in_per_m=2.0, price_out_per_m=8.0))
        # A response cache of its own: the sync run's answers would serve every row (same request, same namespace).
        monkeypatch.setenv("RAYCLS_RESPONSE_CACHE", str(tmp_path / "batch-cache"))
        batch = run_job(spec_for(tmp_path / "b", srv.base_url, price_in_per_m=2.0, price_out_per_m=8.0))
        counters = srv.batches.counters()
    by_id = {r[schema.ID]: r for r in written(sync.output_path)}
    out = written(batch.output_path)
    assert len(out) == len(ROWS) and {r[schema.ID] for r in out} == set(by_id)
    for row in out:
        ref = by_id[row[schema.ID]]
        assert (row[schema.LABEL], row[schema.ERROR], row[schema.LABEL_PROBS]) == \
            (ref[schema.LABEL], ref[schema.ERROR], ref[schema.LABEL_PROBS])
        assert row[schema.INPUT_TOKENS] == ref[schema.INPUT_TOKENS]
    assert counters.uploads == 3 and counters.batches_created == 3  # 23 non-empty rows, 10 a file
    assert set(counters.by_key) == set(KEYS)  # keys rotate across batches
    assert batch.metrics["cost_usd"] == pytest.approx(sync.metrics["cost_usd"] * 0.5)
    assert batch.metrics["cost_usd_sync"] == pytest.approx(sync.metrics["cost_usd"])


def test_line_errors_malformed_lines_and_reasks_go_to_a_second_round(tmp_path, ray_local):
    with FakeOpenAI(FakeOpenAIConfig(keys=KEYS, labels=LABELS, oracle=oracle, offlabel_rate=0.3, seed=3,
                                     batch={"line_errors_every": 4, "malformed_every": 5})) as srv:
        result = run_job(spec_for(tmp_path, srv.base_url, batch_max_requests=100, max_retries=2, max_reasks=2))
        counters = srv.batches.counters()
    out = written(result.output_path)
    assert len(out) == len(ROWS) and len({r[schema.ID] for r in out}) == len(ROWS)
    batch = result.metrics["batch"]
    assert batch["line_errors"] > 0 and batch["malformed_lines"] > 0 and batch["reasks"] > 0
    assert counters.batches_created >= 2
    for row in out:
        assert row[schema.LABEL] in LABELS or row[schema.ERROR] in (schema.EMPTY_TEXT, schema.UNPARSEABLE, schema.API_ERROR)
    records = BatchState.of(result.output_path).records()
    second = {rid for r in records[1:] for rid in r["rows"]}
    assert second and second < {r[schema.ID] for r in out}  # only the rows that needed it


def driver_for(tmp_path, base_url, **backend):
    """The driver-side submitter of a batch job, without Ray: rounds against the server over HTTP."""
    from raycls.backends.api.batch import BatchLabeller
    from raycls.prompting.prompts import build_plan

    spec = spec_for(tmp_path, base_url, **backend)
    return BatchLabeller(spec, build_plan(spec)).start(BatchState.of(str(tmp_path / "out")))


TEXTS = [(f"r{i}", r["text"], False) for i, r in enumerate(ROWS) if r["text"]]


def test_an_expired_batch_resubmits_only_its_unfinished_rows(tmp_path):
    with server(expire={0: 0.5}) as srv:
        driver = driver_for(tmp_path, srv.base_url, batch_max_requests=100)
        driver.submit(TEXTS)
        driver.wait()
        assert srv.batches.counters().uploads == 2
    first, *rest = BatchState.of(str(tmp_path / "out")).records()
    assert first["status"] == "expired" and len(first["rows"]) == len(TEXTS)
    resent = [rid for r in rest for rid in r["rows"]]
    done = int(len(TEXTS) * 0.5)
    assert sorted(resent) == sorted(first["rows"][done:])  # only the rows the window left unanswered
    latest = driver.latest
    assert set(latest) == {rid for rid, _, _ in TEXTS} and all(r["final"] for r in latest.values())


@pytest.mark.parametrize("ours", [60, None])
def test_the_enqueued_token_limit_is_respected(tmp_path, ours):
    """Ours at the provider's: never over it, never refused. None: the provider's error makes the job back off."""
    with server(enqueued_token_limit=60, steps_per_state=2) as srv:
        driver = driver_for(tmp_path, srv.base_url, batch_max_requests=1, max_enqueued_tokens=ours)
        driver.submit(TEXTS)
        driver.wait()
        counters = srv.batches.counters()
    assert all(r["final"] for r in driver.latest.values()) and len(driver.latest) == len(TEXTS)
    assert counters.max_enqueued_tokens <= 60 and counters.requests_enqueued == len(TEXTS)
    assert counters.uploads == len(TEXTS)  # a refused batch is created again from its file, never re-uploaded
    if ours:
        assert counters.token_limit_failures == 0
    else:
        assert counters.token_limit_failures > 0 and driver.counters["token_limit_backoffs"] > 0


@pytest.mark.timeout(1200)
def test_kill_the_driver_while_it_waits_then_run_again(tmp_path):
    """The job is killed (SIGKILL, its whole process group) while its batches are at the provider:
    the next run polls the same batches, uploads nothing, and writes every row once."""
    import os
    import signal
    import tempfile
    import time

    import yaml

    from raycls.testing.crashes import own_ray_env, start_job

    with server(hold=True) as srv:
        spec_for(tmp_path, srv.base_url)  # writes the input and the key file the job below reads
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({
            "input": {"path": str(tmp_path / "in.jsonl"), "gold_column": "label"}, "labels": LABELS,
            "output": {"path": str(tmp_path / "out")},
            "backend": {"kind": "openai", "base_url": srv.base_url, "model": "fake-model",
                        "api_keys": [f"file:{tmp_path / 'keys.txt'}"], **UNPACED, **BATCH}}))
        state = BatchState.of(str(tmp_path / "out"))
        proc = start_job(config, tmp_path / "out", tmp_path / "job.log",
                         env={**own_ray_env(tempfile.mkdtemp(prefix="rbk", dir="/tmp"))})
        deadline = time.monotonic() + 480  # a Ray of its own starts first: slow on a busy machine
        while proc.poll() is None and time.monotonic() < deadline:
            records = state.records() if state.exists() else []
            if len(records) == 3 and all(r.get("batch_id") for r in records):
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        proc.wait(timeout=60)
        uploads = srv.batches.counters().uploads
        assert uploads == 3
        srv.batches.release()
        again = start_job(config, tmp_path / "out", tmp_path / "job.log",  # as the user runs it again
                          env={**own_ray_env(tempfile.mkdtemp(prefix="rbk", dir="/tmp"))})
        assert again.wait(timeout=480) == 0, (tmp_path / "job.log").read_text()[-3000:]
        counters = srv.batches.counters()
    assert counters.uploads == uploads and counters.batches_created == 3
    out = written(tmp_path / "out")
    assert len(out) == len(ROWS) and len({r[schema.ID] for r in out}) == len(ROWS)
    assert all(r[schema.LABEL] in LABELS for r in out if r[schema.ERROR] is None)


def test_no_wait_then_status_then_a_second_run_collects(tmp_path, ray_local, capsys):
    from raycls.cli import main

    with server(hold=True) as srv:
        spec = spec_for(tmp_path, srv.base_url)
        first = run_job(spec, no_wait=True)
        assert first.metrics["pending"] == 23
        assert len(written(first.output_path)) == 1  # only the empty row, which costs no call
        capsys.readouterr()
        assert main(["status", "--output", first.output_path]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["rows_in_flight"] == 23 and shown["batches_by_status"] == {"in_progress": 3}
        assert {b["rows"] for b in shown["batches"]} == {10, 3}
        uploads = srv.batches.counters().uploads
        srv.batches.release()
        second = run_job(spec)
        assert srv.batches.counters().uploads == uploads  # collected, nothing uploaded again
    out = written(second.output_path)
    assert len(out) == len(ROWS) and len({r[schema.ID] for r in out}) == len(ROWS)


def test_cache_hits_are_not_submitted(tmp_path, ray_local):
    cache = tmp_path / "cache"
    with server() as srv:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        run_job(spec_for(tmp_path / "a", srv.base_url, cache=cache))
        before = srv.batches.counters().requests_enqueued
        again = run_job(spec_for(tmp_path / "b", srv.base_url, cache=cache))
        assert srv.batches.counters().requests_enqueued == before
    out = written(again.output_path)
    assert len(out) == len(ROWS) and sum(bool(r[schema.CACHED]) for r in out) == 23


def test_dry_run_prices_at_the_batch_price_with_the_sync_price_beside(tmp_path):
    from raycls.backends.api.batch import BatchLabeller
    from raycls.job.estimate import format_estimate
    from raycls.prompting.prompts import build_plan

    spec = spec_for(tmp_path, "http://127.0.0.1:9/v1", price_in_per_m=2.0, price_out_per_m=8.0)
    est = BatchLabeller(spec, build_plan(spec)).estimate(10, 1_000_000, 100_000)
    assert est["est_cost_usd_max_sync"] == pytest.approx(2.8) and est["est_cost_usd_max"] == pytest.approx(1.4)
    shown = format_estimate({"rows": 10, "model_calls": 10, "rows_empty": 0, "rows_truncated": 0, "tokens_counted": "estimated",
                             "est_input_tokens": 1_000_000, "est_output_tokens_max": 100_000, **est})
    assert "at most $1.4000 at the batch price (synchronous: $2.8000)" in shown
