"""Incremental labelling of a growing lake: only new files, once each, across overlapping and
crashed runs. Real local Ray, the fault-injection server as the backend (it records which
rows it was asked about), real subprocesses for the overlapping and killed runs.

The overlapping calls are two drivers on the session's Ray cluster (as two `ray job submit`s
on one cluster are); the killed call runs on a Ray of its own, killed whole, as a machine
that goes away: a driver killed on a shared cluster leaves its tasks running for a while."""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raycls.job import incremental
from raycls.config import parse_spec
from raycls.testing import crashes
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig
from tests.conftest import LAKE_LABELS, RecordingOracle, lake_rows, lake_spec, start_label_new

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def write_part(lake: Path, partition: str, part: int, n: int) -> list[str]:
    """Write `<lake>/<partition>/part-<part>.parquet`; returns its rows' tags."""
    rows = lake_rows(partition, part, n)
    (lake / partition).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), lake / partition / f"part-{part}.parquet")
    return [f"{partition}/{part}/{i}" for i in range(n)]


def recording_server(latency_ms: float = 5) -> tuple[FakeOpenAI, RecordingOracle]:
    oracle = RecordingOracle()
    server = FakeOpenAI(FakeOpenAIConfig(keys=["k1"], labels=LAKE_LABELS, oracle=oracle, latency_ms=latency_ms))
    server.start()
    return server, oracle


def key_file(directory: Path) -> Path:
    path = directory / "keys.txt"
    path.write_text("k1\n")
    return path


def partitions(out: Path) -> list[Path]:
    return sorted(out.glob(f"{incremental.BATCH_PREFIX}*"))


def output_ids(out: Path) -> list[str]:
    return [row["id"] for part in partitions(out) for row in crashes.output_rows(part)]


# --- three scheduled calls in a row: the first, one after a new partition, one with nothing new --


@pytest.fixture(scope="module")
def history(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("incremental")
    lake, out = root / "lake", root / "out"
    server, oracle = recording_server()
    try:
        spec = parse_spec(lake_spec(str(lake), str(out), server.base_url, key_file(root)))
        first_tags = write_part(lake, "dt=2026-11-21", 0, 4) + write_part(lake, "dt=2026-11-21", 1, 4)
        first_tags += write_part(lake, "dt=2026-11-22", 0, 4)
        first = incremental.label_new(spec)
        seen_first = list(oracle.seen)
        new_tags = write_part(lake, "dt=2026-11-23", 0, 3) + write_part(lake, "dt=2026-11-23", 1, 3)
        planned = incremental.plan(spec)
        second = incremental.label_new(spec)
        seen_second = oracle.seen[len(seen_first):]
        third = incremental.label_new(spec)
        seen_third = oracle.seen[len(seen_first) + len(seen_second):]
    finally:
        server.stop()
    return {"spec": spec, "out": out, "first": first, "second": second, "third": third, "planned": planned,
            "first_tags": first_tags, "new_tags": new_tags,
            "seen": (seen_first, seen_second, seen_third)}


def test_first_run_labels_every_existing_file(history):
    assert sorted(history["seen"][0]) == sorted(history["first_tags"])
    assert len(history["first"].labelled) == 1
    assert history["first"].labelled[0]["rows"] == len(history["first_tags"])


def test_dry_run_lists_only_the_files_not_yet_labelled(history):
    assert history["planned"].new_files == ["dt=2026-11-23/part-0.parquet", "dt=2026-11-23/part-1.parquet"]


def test_second_run_labels_only_the_new_files(history):
    assert sorted(history["seen"][1]) == sorted(history["new_tags"])
    files = [f["path"] for f in history["second"].labelled[0]["files"]]
    assert files == ["dt=2026-11-23/part-0.parquet", "dt=2026-11-23/part-1.parquet"]


def test_each_run_adds_a_partition_holding_a_normal_output(history):
    parts = partitions(history["out"])
    assert len(parts) == 2
    for part in parts:
        assert list((part / "data").glob("*.parquet")) and (part / "metrics.json").is_file()
    newest = {row["id"].split(":")[0] for row in crashes.output_rows(parts[1])}
    assert newest == {"dt=2026-11-23/part-0.parquet", "dt=2026-11-23/part-1.parquet"}  # ids stay relative to the lake


def test_every_row_is_in_the_output_once(history):
    ids = output_ids(history["out"])
    assert len(ids) == len(set(ids)) == len(history["first_tags"]) + len(history["new_tags"])


def test_manifest_records_each_file_with_its_batch_and_rows(history):
    records = incremental.batch_records(incremental.Layout.of(history["spec"]))
    assert [r["state"] for r in records] == [incremental.FINISHED] * 2
    assert [r["rows"] for r in records] == [len(history["first_tags"]), len(history["new_tags"])]
    files = [f for r in records for f in r["files"]]
    assert len({f["path"] for f in files}) == len(files) == 5
    assert all(f["size"] > 0 and f["mtime"] for f in files) and all(r["finished_at"] for r in records)


def test_a_run_with_nothing_new_does_nothing_and_says_so(history):
    third = history["third"]
    assert third.labelled == [] and history["seen"][2] == []
    assert len(partitions(history["out"])) == 2
    assert incremental.describe_outcome(third, "out").startswith("nothing new to label")


# --- claims: racing processes -----------------------------------------------------------------


def _claim_all(output: str, lake: str, batch: str, start: multiprocessing.Barrier, result: multiprocessing.Queue) -> None:
    """One racer: list the lake, then claim every file for `batch` once all racers are ready."""
    spec = parse_spec(lake_spec(lake, output, "http://127.0.0.1:9/v1", Path(lake) / "keys.txt"))
    files = incremental.list_input(spec)
    wanted = [incremental.relpath(files, f) for f in files.files]
    start.wait(timeout=120)  # every racer has imported and listed: they claim together
    won = incremental.claim_files(incremental.Layout.of(spec), files, wanted, batch)
    result.put((batch, [f["path"] for f in won]))


def test_racing_claims_give_each_file_to_exactly_one_batch(tmp_path):
    lake = tmp_path / "lake"
    for part in range(12):
        write_part(lake, "dt=2026-11-24", part, 1)
    ctx = multiprocessing.get_context("spawn")
    start, result = ctx.Barrier(3), ctx.Queue()
    racers = [ctx.Process(target=_claim_all, args=(str(tmp_path / "out"), str(lake), f"b{i}", start, result))
              for i in range(3)]
    for racer in racers:
        racer.start()
    won = dict(result.get(timeout=180) for _ in racers)
    for racer in racers:
        racer.join(timeout=30)
    claimed = [path for paths in won.values() for path in paths]
    assert sorted(claimed) == sorted(f"dt=2026-11-24/part-{p}.parquet" for p in range(12))  # each exactly once


# --- two scheduled calls at once, as real processes -----------------------------------------


def _spec_file(root: Path, lake: Path, out: Path, base_url: str, **backend) -> Path:
    config = root / "spec.yaml"
    config.write_text(yaml.safe_dump(lake_spec(str(lake), str(out), base_url, key_file(root), **backend)))
    return config


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("overlap")
    lake, out = root / "lake", root / "out"
    tags = [t for part in range(6) for t in write_part(lake, f"dt=2026-11-2{part // 3 + 5}", part, 3)]
    server, oracle = recording_server(latency_ms=20)
    config = _spec_file(root, lake, out, server.base_url, batch_size=3)
    cluster = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    # at most 3 files each: both calls label a batch whatever their timing, racing for the same files
    procs = [start_label_new(config, root / f"run{i}.log", env=cluster, extra=["--max-files", "3"]) for i in range(2)]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            _stop(p)
        server.stop()
    logs = [(root / f"run{i}.log").read_text() for i in range(2)]
    return {"out": out, "tags": tags, "seen": list(oracle.seen), "codes": codes, "logs": logs,
            "records": incremental.batch_records(incremental.Layout(str(out)))}


def test_overlapping_runs_both_succeed(overlapping):
    assert overlapping["codes"] == [0, 0], overlapping["logs"]


def test_overlapping_runs_each_label_a_batch_of_their_own(overlapping):
    assert sorted(len(r["files"]) for r in overlapping["records"]) == [3, 3]
    assert len({r["pid"] for r in overlapping["records"]}) == 2


def test_overlapping_runs_never_label_a_file_twice(overlapping):
    repeated = [tag for tag, n in collections.Counter(overlapping["seen"]).items() if n > 1]
    assert repeated == []
    files = [f["path"] for r in overlapping["records"] for f in r["files"]]
    assert len(files) == len(set(files))


def test_overlapping_runs_together_label_every_file(overlapping):
    assert sorted(overlapping["seen"]) == sorted(overlapping["tags"])
    ids = output_ids(overlapping["out"])
    assert len(ids) == len(set(ids)) == len(overlapping["tags"])


# --- a run killed mid-batch, then the next scheduled call --------------------------------------


@pytest.fixture(scope="module")
def killed_then_next(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("killed")
    lake, out = root / "lake", root / "out"
    tags = [t for part in range(6) for t in write_part(lake, "dt=2026-11-28", part, 4)]
    server, oracle = recording_server(latency_ms=300)  # slow enough to be killed mid-batch
    config = _spec_file(root, lake, out, server.base_url, batch_size=4, max_concurrency=1)
    try:
        first = start_label_new(config, root / "first.log")
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and first.poll() is None:
                parts = partitions(out)
                if parts and crashes.committed_files(parts[0]):
                    break
                time.sleep(0.2)
            os.killpg(first.pid, signal.SIGKILL)  # the machine going away: every process of the run
            first.wait()
        finally:
            _stop(first)
        committed = set(crashes.committed_rows(partitions(out)[0]))
        seen_before = len(oracle.seen)
        spec = parse_spec(yaml.safe_load(config.read_text()))
        outcome = incremental.label_new(spec)  # the next call, here on the session's Ray
        seen_after = oracle.seen[seen_before:]
    finally:
        server.stop()
    return {"out": out, "tags": tags, "committed": committed, "seen_after": seen_after, "outcome": outcome,
            "records": incremental.batch_records(incremental.Layout(str(out)))}


def test_a_killed_run_is_finished_by_the_next(killed_then_next):
    assert [b["batch"] for b in killed_then_next["outcome"].labelled] == [killed_then_next["records"][0]["batch"]]
    [record] = killed_then_next["records"]  # the same batch, not a second one for its files
    assert record["state"] == incremental.FINISHED and record["resumed"] == 1
    ids = output_ids(killed_then_next["out"])
    assert len(ids) == len(set(ids)) == len(killed_then_next["tags"])


def test_the_next_run_relabels_no_committed_row(killed_then_next):
    assert killed_then_next["committed"], "the kill landed before anything was committed"
    committed_tags = {row_id_tag(i) for i in killed_then_next["committed"]}
    assert committed_tags.isdisjoint(killed_then_next["seen_after"])
    assert set(killed_then_next["seen_after"]) == set(killed_then_next["tags"]) - committed_tags


def row_id_tag(row_id: str) -> str:
    """`dt=X/part-P.parquet:I` (a row id) -> `dt=X/P/I` (the tag in its text)."""
    path, index = row_id.rsplit(":", 1)
    partition, name = path.split("/")
    return f"{partition}/{name[len('part-'):-len('.parquet')]}/{index}"


# --- unfinished batches: whose holder is alive, whose holder died (no Ray needed) -----------


def _unfinished_batch(tmp_path: Path, holder_pid: int) -> tuple:
    """A lake of two files and a batch record in state `claiming` (nothing claimed yet), its
    lease last renewed just now by `holder_pid` on this host."""
    from raycls import storage

    from raycls.job import lease
    lake = tmp_path / "lake"
    write_part(lake, "dt=2026-11-29", 0, 1)
    write_part(lake, "dt=2026-11-29", 1, 1)
    spec = parse_spec(lake_spec(str(lake), str(tmp_path / "out"), "http://127.0.0.1:9/v1", tmp_path / "keys.txt"))
    layout = incremental.Layout.of(spec)
    batch = "20261129T000000Z-dead00"
    holder = {"host": lease._HOST, "pid": holder_pid, "pgid": None, "token": "another-process",
              "renewed_at": time.time(), "ttl_s": 60.0, "released": False}
    assert storage.create_exclusive(storage.join(layout.lease(batch), "000000000.json"), holder)
    storage.write_json(layout.running_record(batch), {"batch": batch, "state": incremental.CLAIMING,
                                                      "wanted": ["dt=2026-11-29/part-0.parquet"], "files": []})
    return spec, layout, batch


def test_a_batch_held_by_a_live_run_is_left_alone(tmp_path):
    spec, layout, batch = _unfinished_batch(tmp_path, holder_pid=os.getppid())  # alive
    outcome = incremental.Outcome()
    incremental.resume_unfinished(spec, layout, incremental.list_input(spec), outcome)
    assert outcome.busy == [batch] and outcome.labelled == []
    assert incremental.unfinished_records(layout)[0]["batch"] == batch


def test_a_batch_whose_run_died_before_claiming_is_dropped_and_its_files_stay_free(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    spec, layout, batch = _unfinished_batch(tmp_path, holder_pid=dead.pid)
    outcome = incremental.Outcome()
    incremental.resume_unfinished(spec, layout, incremental.list_input(spec), outcome)
    assert outcome.busy == [] and incremental.unfinished_records(layout) == []
    assert not Path(layout.partition(batch)).exists()
    assert incremental.plan(spec).new_files == ["dt=2026-11-29/part-0.parquet", "dt=2026-11-29/part-1.parquet"]
