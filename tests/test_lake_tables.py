"""Lake tables in and out (`raycls.lake`): an Iceberg table (PyIceberg SQL catalog on SQLite,
warehouse on local disk and on the S3-protocol server) labelled snapshot by snapshot into an
Iceberg labels table, exactly once; rewrites under each `on_rewrite` policy; kills before
and after the commit; two overlapping calls; a Delta table labelled by version.

Real local Ray, the recording fault-injection server as the backend (it tells which rows were
asked about), every job with a response cache of its own under tmp_path."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

pytest.importorskip("pyiceberg")
pytest.importorskip("deltalake")

from raycls.config import parse_spec  # noqa: E402
from raycls.errors import SpecError  # noqa: E402
from raycls.lake import iceberg, runs  # noqa: E402
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig  # noqa: E402
from tests.conftest import LAKE_LABELS, RecordingOracle, start_label_new  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def rows(tag: str, n: int) -> pa.Table:
    """`n` rows with ids `<tag>-<i>` and texts the RecordingOracle tells apart."""
    return pa.table({"doc_id": [f"{tag}-{i}" for i in range(n)],
                     "text": [f"row {tag}/{i}: the room was {'clean' if i % 2 else 'dirty'}" for i in range(n)],
                     "label": [LAKE_LABELS[i % 2] for i in range(n)]})


def tags(table: pa.Table) -> list[str]:
    return [t.split(":")[0][len("row "):] for t in table.column("text").to_pylist()]


def catalog_props(root: Path, warehouse: str, **extra) -> dict:
    return {"name": "lake", "type": "sql", "uri": f"sqlite:///{root}/catalog.db", "warehouse": warehouse, **extra}


def source_table(props: dict, name: str = "db.news"):
    from pyiceberg.catalog import load_catalog

    from raycls.lake import catalog_properties

    catalog_name, resolved = catalog_properties(props, "test")
    catalog = load_catalog(catalog_name, **resolved)
    catalog.create_namespace_if_not_exists("db")
    return catalog.create_table(name, schema=rows("x", 1).schema)


def spec_dict(root: Path, base_url: str, input_: dict, output: dict) -> dict:
    (root / "keys.txt").write_text("k1\n")
    return {"input": {"id_column": "doc_id", "gold_column": "label", **input_}, "labels": LAKE_LABELS,
            "output": output, "cache": {"path": str(root / "cache")},
            "backend": {"kind": "openai", "base_url": base_url, "model": "fake-model", "api_keys": [f"file:{root / 'keys.txt'}"],
                        "rpm": 6000, "tpm": 100_000_000}}


@pytest.fixture(scope="module")
def ray_local(moto_s3, ray_local):
    """This module's Ray, started once the S3 server's settings are in this process's environment:
    its workers inherit them, as a job's own Ray does. The S3 variant's staging output (labels and
    Ray's checkpoint) is written by those workers, through the usual AWS settings; the catalog's
    own `s3.*` properties reach the data files' readers with the planned scan."""
    return ray_local


@pytest.fixture(scope="module")
def server():
    oracle = RecordingOracle()
    srv = FakeOpenAI(FakeOpenAIConfig(keys=["k1"], labels=LAKE_LABELS, oracle=oracle))
    srv.start()
    yield srv, oracle
    srv.stop()


def labels_rows(spec) -> pa.Table:
    return iceberg.load_labels(spec.output, spec.input).scan().to_arrow()


# --- three appended snapshots, label-new after each --------------------------------------------


def _three_snapshots(root: Path, props: dict, out: str, server) -> dict:
    srv, oracle = server
    table = source_table(props)
    spec = parse_spec(spec_dict(root, srv.base_url, {"format": "iceberg", "table": "db.news", "catalog": props},
                                {"path": out, "format": "iceberg", "table": "db.news_labels"}))
    appended, seen, outcomes = [], [], []
    for i, n in enumerate((5, 3, 4)):
        batch = rows(f"{root.name}-s{i}", n)
        table.append(batch)
        appended.append(tags(batch))
        before = len(oracle.seen)
        outcomes.append(runs.label_new(spec))
        seen.append(oracle.seen[before:])
    before = len(oracle.seen)
    outcomes.append(runs.label_new(spec))  # nothing new
    seen.append(oracle.seen[before:])
    table.refresh()
    return {"spec": spec, "table": table, "appended": appended, "seen": seen, "outcomes": outcomes}


@pytest.fixture(scope="module", params=["local", "s3"])
def three(request, tmp_path_factory, ray_local, moto_s3, server):
    """The catalog on SQLite, the warehouse and the output on local disk, or both on the S3 server."""
    root = tmp_path_factory.mktemp(f"ice-{request.param}")
    if request.param == "local":
        return _three_snapshots(root, catalog_props(root, f"file://{root}/wh"), str(root / "out"), server)
    bucket = f"raycls-lake-{root.name.replace('_', '-')[-20:].strip('-').lower()}"
    moto_s3.fs().mkdir(bucket)
    props = catalog_props(root, f"s3://{bucket}/wh", **{"s3.endpoint": moto_s3.endpoint, "s3.region": "us-east-1",
                                                          "s3.access-key-id": "env:AWS_ACCESS_KEY_ID",
                                                          "s3.secret-access-key": "env:AWS_SECRET_ACCESS_KEY"})
    return _three_snapshots(root, props, f"s3://{bucket}/out", server)


def test_each_call_labels_only_the_snapshot_appended_since_the_last(three):
    for appended, seen in zip(three["appended"], three["seen"]):
        assert sorted(seen) == sorted(appended)


def test_every_source_row_is_in_the_labels_table_exactly_once(three):
    labelled = labels_rows(three["spec"])
    ids = labelled.column("id").to_pylist()
    source_ids = three["table"].scan().to_arrow().column("doc_id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(source_ids)
    assert set(labelled.column("label").to_pylist()) <= set(LAKE_LABELS)


def test_each_run_is_one_commit_carrying_its_watermark(three):
    spec, table = three["spec"], three["table"]
    commits = runs.committed(spec)
    source_snapshots = [s.snapshot_id for s in table.snapshots()]
    assert [c["snapshot"] for c in commits] == source_snapshots
    assert [c["from"] for c in commits] == [None, *source_snapshots[:-1]]
    assert [c["rows"] for c in commits] == [len(a) for a in three["appended"]]
    assert len(iceberg.load_labels(spec.output, spec.input).snapshots()) == 3
    assert len({c["fingerprint"] for c in commits}) == 1


def test_a_call_with_nothing_new_says_so(three):
    last = three["outcomes"][-1]
    assert last.committed == [] and three["seen"][-1] == []
    assert runs.describe_outcome(last, "x").startswith("nothing new to label")
    assert runs.status(three["spec"])["watermark"] == three["table"].current_snapshot().snapshot_id


# --- validation before anything is spent ----------------------------------------------------------


def test_a_missing_table_column_or_filter_is_named(tmp_path, server):
    props = catalog_props(tmp_path, f"file://{tmp_path}/wh")
    source_table(props).append(rows("v", 2))
    base = spec_dict(tmp_path, server[0].base_url, {"format": "iceberg", "table": "db.news", "catalog": props},
                     {"path": str(tmp_path / "out")})
    from raycls.inputs.sources import resolve_input

    for change, key in [({"table": "db.nope"}, "input.table"), ({"gold_column": "nope"}, "input.gold_column"),
                        ({"row_filter": "nope = 1"}, "input.row_filter"), ({"snapshot": 123}, "input.snapshot")]:
        spec = parse_spec({**base, "input": {**base["input"], **change}})
        with pytest.raises(SpecError) as err:
            resolve_input(spec.input)
        assert err.value.key == key
    bad = {**base, "input": {**base["input"], "catalog": {**props, "s3.secret-access-key": "AKIA-literal"}}}
    with pytest.raises(SpecError, match="env:VARIABLE") as err:
        parse_spec(bad)
    assert "AKIA-literal" not in str(err.value)


# --- a snapshot that is not an append, under each on_rewrite policy ------------------------------


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory, ray_local, server):
    results = {}
    for policy in ("error", "skip", "relabel"):
        root = tmp_path_factory.mktemp(f"rewrite-{policy}")
        props = catalog_props(root, f"file://{root}/wh")
        table = source_table(props)
        spec = parse_spec({**spec_dict(root, server[0].base_url, {"format": "iceberg", "table": "db.news", "catalog": props},
                                       {"path": str(root / "out"), "format": "iceberg", "table": "db.news_labels"}),
                           "incremental": {"on_rewrite": policy}})
        table.append(rows(f"{policy}-a", 4))
        runs.label_new(spec)
        table.overwrite(rows(f"{policy}-b", 3))  # an overwrite snapshot
        table.append(rows(f"{policy}-c", 2))
        before = len(server[1].seen)
        try:
            outcome, error = runs.label_new(spec), None
        except runs.RewriteError as exc:
            outcome, error = None, exc
        table.refresh()
        results[policy] = {"spec": spec, "table": table, "outcome": outcome, "error": error,
                           "seen": server[1].seen[before:]}
    return results


def test_on_rewrite_error_names_the_snapshot_and_labels_nothing(rewritten):
    r = rewritten["error"]
    rewrite = [s for s in r["table"].snapshots() if s.summary.operation.value != "append"][0]  # PyIceberg's overwrite: a delete first
    assert f"snapshot {rewrite.snapshot_id} is a {rewrite.summary.operation.value}, not an append" in str(r["error"])
    assert r["seen"] == [] and len(runs.committed(r["spec"])) == 1


def test_on_rewrite_skip_labels_only_the_appended_rows(rewritten):
    """PyIceberg's overwrite is a delete snapshot and an append snapshot in one commit: the rows
    of that append were written by the rewrite, so only the later append's rows are labelled."""
    r = rewritten["skip"]
    appended = r["table"].current_snapshot()
    assert sorted(r["seen"]) == sorted(f"skip-c/{i}" for i in range(2))
    last = runs.committed(r["spec"])[-1]
    assert last["rows"] == 2 and last["per_snapshot"] == {str(appended.snapshot_id): 2}
    assert runs.status(r["spec"])["watermark"] == appended.snapshot_id


def test_on_rewrite_relabel_replaces_the_labels_with_the_table_as_it_is(rewritten):
    r = rewritten["relabel"]
    labelled = sorted(labels_rows(r["spec"]).column("id").to_pylist())
    assert labelled == sorted(r["table"].scan().to_arrow().column("doc_id").to_pylist())
    assert runs.committed(r["spec"])[-1]["mode"] == "relabel"


# --- kills before and after the commit; two calls at once (real processes) ----------------------


def _run_file(root: Path, spec: dict) -> Path:
    config = root / "spec.yaml"
    config.write_text(yaml.safe_dump(spec))
    return config


def _finish(proc, timeout=300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def killed(tmp_path_factory, ray_local, server):
    srv, oracle = server
    found = {}
    for point in ("before-commit", "after-commit"):
        root = tmp_path_factory.mktemp(f"kill-{point}")
        props = catalog_props(root, f"file://{root}/wh")
        table = source_table(props)
        table.append(rows(f"{point}-a", 4))
        raw = spec_dict(root, srv.base_url, {"format": "iceberg", "table": "db.news", "catalog": props},
                        {"path": str(root / "out"), "format": "iceberg", "table": "db.news_labels"})
        before = len(oracle.seen)
        code = _finish(start_label_new(_run_file(root, raw), root / "run.log", env={"RAYCLS_LAKE_CRASH": point}))
        spec = parse_spec(raw)
        commits_after_kill = runs.committed(spec)
        middle = len(oracle.seen)
        outcome = runs.label_new(spec)
        found[point] = {"code": code, "log": (root / "run.log").read_text(), "commits_after_kill": commits_after_kill,
                        "first": oracle.seen[before:middle], "next": oracle.seen[middle:], "outcome": outcome,
                        "spec": spec, "tags": tags(rows(f"{point}-a", 4))}
    return found


def test_killed_before_the_commit_leaves_no_labels_and_the_next_call_commits_them(killed):
    k = killed["before-commit"]
    assert k["code"] == -signal.SIGKILL, k["log"]
    assert k["commits_after_kill"] == [] and sorted(k["first"]) == sorted(k["tags"])
    assert len(k["outcome"].committed) == 1 and k["next"] == []  # the staged labels were committed, not bought again
    ids = labels_rows(k["spec"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4


def test_killed_after_the_commit_the_next_call_redoes_nothing(killed):
    k = killed["after-commit"]
    assert k["code"] == -signal.SIGKILL, k["log"]
    assert len(k["commits_after_kill"]) == 1 and k["outcome"].committed == [] and k["next"] == []
    assert len(labels_rows(k["spec"])) == 4


def test_two_calls_at_once_commit_each_row_once(tmp_path, ray_local, server):
    srv, oracle = server
    props = catalog_props(tmp_path, f"file://{tmp_path}/wh")
    table = source_table(props)
    table.append(rows("both-a", 6))
    raw = spec_dict(tmp_path, srv.base_url, {"format": "iceberg", "table": "db.news", "catalog": props},
                    {"path": str(tmp_path / "out"), "format": "iceberg", "table": "db.news_labels"})
    config = _run_file(tmp_path, raw)
    cluster = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    procs = [start_label_new(config, tmp_path / f"run{i}.log", env=cluster) for i in range(2)]
    codes = [_finish(p) for p in procs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    spec = parse_spec(raw)
    ids = labels_rows(spec).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6 and len(runs.committed(spec)) == 1
    repeated = [t for t, n in collections.Counter(oracle.seen).items() if n > 1 and t.startswith("both-a")]
    assert repeated == []


# --- Delta: labelled, appended to, labelled again by version --------------------------------------


def test_a_delta_table_is_labelled_again_only_for_the_appended_version(tmp_path, ray_local, server):
    from deltalake import write_deltalake

    srv, oracle = server
    path = str(tmp_path / "delta")
    write_deltalake(path, rows("delta-a", 4))
    spec = parse_spec(spec_dict(tmp_path, srv.base_url, {"format": "delta", "path": path}, {"path": str(tmp_path / "out")}))
    before = len(oracle.seen)
    first = runs.label_new(spec)
    middle = len(oracle.seen)
    write_deltalake(path, rows("delta-b", 3), mode="append")
    second = runs.label_new(spec)
    assert sorted(oracle.seen[before:middle]) == sorted(tags(rows("delta-a", 4)))
    assert sorted(oracle.seen[middle:]) == sorted(tags(rows("delta-b", 3)))
    assert [c["snapshot"] for c in first.committed + second.committed] == [0, 1]
    assert runs.status(spec)["rows_labelled"] == 7
