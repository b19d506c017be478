"""How long `label-new` takes to plan over a lake table, against the folder-of-files `label-new`.

    python benchmarks/lake_tables.py [--rows 1000000] [--snapshots 20] [--new 50000] [--repeats 5]

Builds, in a temp dir, an Iceberg table (PyIceberg SQL catalog on SQLite, local warehouse) of
`--rows` short texts in `--snapshots` appends (one data file, one row group each) and a labels
table whose watermark is the current snapshot (as after a run that labelled everything); and
the same rows as a folder of Parquet files, one per snapshot, all claimed (as after a run).

Measured, planning only (up to the planned files that go to Ray Data; no Ray, no model):
- nothing new: open the table, read the watermark, see there is nothing after it;
- one new snapshot of `--new` rows: the same, plus the snapshot history and PyIceberg's
  incremental append scan; also the id pass over the new rows (the duplicate check a run
  does before any model call), reported apart;
- the folder `label-new` plan (`raycls.job.incremental.plan`) in both states.
Prints one JSON line; the median of `--repeats` runs of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raycls import storage  # noqa: E402

from raycls.job import incremental
from raycls.config import parse_spec  # noqa: E402
from raycls.lake import iceberg, runs  # noqa: E402


def rows(start: int, n: int) -> pa.Table:
    ids = [f"doc-{i}" for i in range(start, start + n)]
    return pa.table({"doc_id": ids, "text": [f"short news text number {i}" for i in range(start, start + n)]})


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--new", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lake-bench-"))
    props = {"name": "bench", "type": "sql", "uri": f"sqlite:///{root}/catalog.db", "warehouse": f"file://{root}/wh"}
    backend = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_keys": ["env:UNUSED"]}
    spec = parse_spec({"input": {"format": "iceberg", "table": "db.news", "catalog": props, "id_column": "doc_id"},
                       "labels": ["a", "b"], "backend": backend,
                       "output": {"path": str(root / "out"), "format": "iceberg", "table": "db.news_labels"}})
    folder = root / "folder"
    folder.mkdir()
    fspec = parse_spec({"input": {"path": str(folder), "id_column": "doc_id"}, "labels": ["a", "b"], "backend": backend,
                        "output": {"path": str(root / "folder_out")}})

    from pyiceberg.catalog import load_catalog

    catalog = load_catalog("bench", **{k: v for k, v in props.items() if k != "name"})
    catalog.create_namespace("db")
    per = args.rows // args.snapshots
    started = time.perf_counter()
    for s in range(args.snapshots):
        batch = rows(s * per, per)
        table = catalog.create_table_if_not_exists("db.news", schema=batch.schema)
        table.append(batch)
        pq.write_table(batch, folder / f"part-{s:03d}.parquet", row_group_size=per)
    built_s = time.perf_counter() - started
    table = catalog.load_table("db.news")
    current = table.current_snapshot().snapshot_id
    empty = runs._staged_rows(spec, str(root / "none"), 0, iceberg.plan(spec.input, table))
    iceberg.commit_labels(spec.output, spec.input, empty,
                          {iceberg.PROP_SOURCE: runs.source_name(spec), iceberg.PROP_SNAPSHOT: str(current)}, expected=None)
    layout = incremental.Layout.of(fspec)
    files = incremental.list_input(fspec)
    incremental.claim_files(layout, files, [incremental.relpath(files, f) for f in files.files], "bench")

    def plan_table():
        source = iceberg.open_table(spec.input)
        start = runs.current_watermark(spec)
        rng = runs.plan_range(spec, source, start)
        planned = runs._planned(spec, source, rng.start, rng.target, rng.history, rng.full) if rng else None
        return rng, planned

    nothing_new = median_s(lambda: plan_table(), args.repeats)
    assert plan_table()[0] is None
    folder_nothing = median_s(lambda: incremental.plan(fspec), args.repeats)
    assert incremental.plan(fspec).new_files == []

    table.append(rows(args.rows, args.new))
    pq.write_table(rows(args.rows, args.new), folder / "part-new.parquet", row_group_size=args.new)
    one_new = median_s(lambda: plan_table(), args.repeats)
    rng, planned = plan_table()
    assert len(planned.tasks) == 1 and planned.rows_planned == args.new
    id_pass = median_s(lambda: iceberg.IcebergDatasource(spec.input, planned), max(1, args.repeats // 2))
    folder_one = median_s(lambda: incremental.plan(fspec), args.repeats)
    assert incremental.plan(fspec).new_files == ["part-new.parquet"]
    storage.remove(str(root), recursive=True)
    print(json.dumps({"rows": args.rows, "snapshots": args.snapshots, "new_rows": args.new, "build_s": round(built_s, 1),
                      "iceberg_plan_nothing_new_s": nothing_new, "iceberg_plan_one_new_snapshot_s": one_new,
                      "iceberg_id_pass_new_rows_s": id_pass, "folder_plan_nothing_new_s": folder_nothing,
                      "folder_plan_one_new_file_s": folder_one}))


if __name__ == "__main__":
    main()
