"""raycls on S3: input, output, checkpoint, manifests, claims and leases on a real S3-protocol
server (moto on 127.0.0.1). Jobs run as subprocesses with the S3 settings in their
environment, as a user runs them: Ray workers inherit `AWS_ENDPOINT_URL_S3` and the keys
(the session's Ray may have started before the S3 server, without them). Two job runs in
all, to keep within budget: one killed mid-batch, one that finishes it and labels a new
partition; every partition is a full raycls output (data, metrics, run manifest) on S3."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import yaml

from raycls import storage

from raycls.job import incremental
from raycls.config import InputSpec
from raycls.inputs.datasource import InputDatasource, check_input, resolve_input
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig
from tests.conftest import LAKE_LABELS, RecordingOracle, lake_rows, lake_spec, start_label_new

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _new_bucket(moto_s3, name: str) -> str:
    moto_s3.fs().mkdir(name)
    return f"s3://{name}"


def _recording_server(latency_ms: float) -> tuple[FakeOpenAI, RecordingOracle]:
    oracle = RecordingOracle()
    server = FakeOpenAI(FakeOpenAIConfig(keys=["k1"], labels=LAKE_LABELS, oracle=oracle, latency_ms=latency_ms))
    server.start()
    return server, oracle


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _read_rows(moto_s3, url: str) -> list[dict]:
    """Every row of the Parquet files under an s3:// prefix, read through pyarrow."""
    fs = moto_s3.fs()
    paths = [p for p in fs.find(url[len("s3://"):]) if p.endswith(".parquet") and "/_" not in p]
    if not paths:
        return []
    return pds.dataset(paths, format="parquet", filesystem=pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs))).to_table().to_pylist()


def _committed_checkpoints(moto_s3, prefix: str) -> list[str]:
    fs = moto_s3.fs()
    return [p for p in fs.find(prefix[len("s3://"):]) if "/_checkpoint/" in p and p.endswith(".parquet")
            and not p.endswith(".pending.parquet")]


# --- atomic creation on the server ------------------------------------------------------------


def test_create_exclusive_has_exactly_one_winner_on_s3(moto_s3, s3_bucket):
    for round_ in range(10):
        url = f"{s3_bucket}/race/{round_}.json"
        barrier, wins = threading.Barrier(2), []

        def race(who: str) -> None:
            barrier.wait()
            if storage.create_exclusive(url, {"who": who}):
                wins.append(who)

        racers = [threading.Thread(target=race, args=(who,)) for who in ("a", "b")]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join()
        assert len(wins) == 1
        assert storage.read_json(url) == {"who": wins[0]}


def test_create_exclusive_refuses_an_existing_record_on_s3(moto_s3, s3_bucket):
    url = f"{s3_bucket}/claims/one.json"
    assert storage.create_exclusive(url, {"n": 1})
    assert not storage.create_exclusive(url, {"n": 2})
    assert storage.read_json(url) == {"n": 1}


# --- JSONL on S3, read by raycls's own reader (the jobs below read Parquet through Ray) ---


def test_a_jsonl_prefix_on_s3_is_listed_and_read_with_stable_ids(moto_s3, s3_bucket):
    fs = moto_s3.fs()
    for part in range(2):
        rows = lake_rows("dt=2026-11-20", part, 3)
        fs.pipe_file(f"{s3_bucket[5:]}/in/dt=2026-11-20/part-{part}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    spec = InputSpec(path=f"{s3_bucket}/in", gold_column="label")
    files = resolve_input(spec)
    check_input(spec, files)
    read = [row for task in InputDatasource(spec, files).get_read_tasks(1) for block in task() for row in block.to_pylist()]
    assert files.format == "jsonl"
    assert [r["id"] for r in read] == [f"dt=2026-11-20/part-{p}.jsonl:{i}" for p in range(2) for i in range(3)]
    assert [r["text"] for r in read] == [r["text"] for p in range(2) for r in lake_rows("dt=2026-11-20", p, 3)]


# --- an incremental lake of Parquet on S3: a killed run, its resume, then a new partition ----


def _put_parquet(moto_s3, bucket: str, partition: str, part: int, n: int) -> list[str]:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(lake_rows(partition, part, n)), buffer)
    moto_s3.fs().pipe_file(f"{bucket[5:]}/lake/{partition}/part-{part}.parquet", buffer.getvalue())
    return [f"{partition}/{part}/{i}" for i in range(n)]


@pytest.fixture(scope="module")
def s3_lake(moto_s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3_lake")
    bucket = _new_bucket(moto_s3, "raycls-lake")
    first_tags = [t for part in range(5) for t in _put_parquet(moto_s3, bucket, "dt=2026-11-21", part, 4)]
    server, oracle = _recording_server(latency_ms=300)  # slow enough to be killed mid-batch
    key_file = root / "keys.txt"
    key_file.write_text("k1\n")
    config = root / "spec.yaml"
    out = f"{bucket}/out"
    config.write_text(yaml.safe_dump(lake_spec(f"{bucket}/lake", out, server.base_url, key_file,
                                               batch_size=4, max_concurrency=1)))
    logs: dict[str, str] = {}

    def run(name: str, kill_after_commit: bool = False) -> int:
        proc = start_label_new(config, root / f"{name}.log", env=moto_s3.env)
        try:
            if kill_after_commit:
                deadline = time.monotonic() + 300
                while proc.poll() is None and time.monotonic() < deadline and not _committed_checkpoints(moto_s3, out):
                    time.sleep(0.3)
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait(timeout=400)
        finally:
            _stop(proc)
        logs[name] = (root / f"{name}.log").read_text()
        return code

    try:
        run("killed", kill_after_commit=True)
        committed_ids = set()
        fs = moto_s3.fs()
        for path in _committed_checkpoints(moto_s3, out):
            with fs.open(path, "rb") as f:
                committed_ids.update(pq.read_table(f).column("id").to_pylist())
        seen_killed = len(oracle.seen)
        new_tags = _put_parquet(moto_s3, bucket, "dt=2026-11-22", 0, 3)  # lands before the next call
        code = run("next")
        seen_next = oracle.seen[seen_killed:]
    finally:
        server.stop()
    return {"out": out, "first_tags": first_tags, "new_tags": new_tags, "committed": committed_ids, "code": code,
            "seen": seen_next, "log": logs["next"], "records": incremental.batch_records(incremental.Layout(out))}


def _tag(row_id: str) -> str:
    path, index = row_id.rsplit(":", 1)
    partition, name = path.split("/")
    return f"{partition}/{name[len('part-'):-len('.parquet')]}/{index}"


def test_the_next_call_on_s3_succeeds(s3_lake):
    assert s3_lake["code"] == 0, s3_lake["log"][-3000:]


def test_the_next_call_on_s3_finishes_the_killed_batch(s3_lake):
    first = s3_lake["records"][0]
    assert first["state"] == incremental.FINISHED and first["resumed"] == 1
    assert first["rows"] == len(s3_lake["first_tags"])


def test_resume_on_s3_relabels_no_committed_row(s3_lake):
    assert s3_lake["committed"], "the kill landed before anything was committed"
    committed = {_tag(i) for i in s3_lake["committed"]}
    assert committed.isdisjoint(s3_lake["seen"])
    assert set(s3_lake["seen"]) == set(s3_lake["first_tags"]) - committed | set(s3_lake["new_tags"])


def test_the_new_partition_on_s3_is_labelled_as_a_batch_of_its_own(s3_lake):
    assert [f["path"] for f in s3_lake["records"][1]["files"]] == ["dt=2026-11-22/part-0.parquet"]
    assert s3_lake["records"][1]["state"] == incremental.FINISHED and "resumed" not in s3_lake["records"][1]


def test_every_row_of_the_lake_is_in_the_s3_output_once(moto_s3, s3_lake):
    ids = [r["id"] for r in _read_rows(moto_s3, s3_lake["out"])]
    assert len(ids) == len(set(ids)) == len(s3_lake["first_tags"]) + len(s3_lake["new_tags"])


def test_partitions_manifests_and_claims_live_on_s3(moto_s3, s3_lake):
    out = s3_lake["out"]
    names = storage.list_names(out)
    assert sorted(n for n in names if n.startswith(incremental.BATCH_PREFIX)) == sorted(
        f"{incremental.BATCH_PREFIX}{r['batch']}" for r in s3_lake["records"])
    assert len(storage.list_names(incremental.Layout(out).claims)) == 6
    for record in s3_lake["records"]:
        assert storage.read_json(f"{record['partition']}/_raycls_run.json")["finished"] is True
        assert storage.read_json(f"{record['partition']}/metrics.json")["rows_written"] == record["rows"]
        assert not storage.exists(f"{record['partition']}/_checkpoint")
