"""Apache Iceberg through PyIceberg: a table as input, and the labels table as output.

**Input.** The driver plans the scan with PyIceberg (`table.scan` at a snapshot, or
`incremental_append_scan` between two snapshots for `label-new`), with the spec's columns
projected and `input.row_filter` pushed into it, and checks the columns before anything is
spent. The planned `FileScanTask`s go to a Ray Data datasource of ours, one read task per
data file, which reads each with PyIceberg's `ArrowScan` (the reader `ray.data.read_iceberg`
uses, so deletes, schema evolution and the residual filter are applied the same way) and
adds the `id` column there. Why not `ray.data.read_iceberg` itself: Ray's checkpoint filter
needs the id at the read (`raycls.inputs.datasource`), and Ray cannot read an incremental append range.

**Output.** The labels table is appended from the driver with PyIceberg after the run's
Parquet is staged and checked (rows out = rows in), in one commit whose snapshot properties
carry the watermark (`raycls.source`, `raycls.source-snapshot`, the job's fingerprint).
Labels and watermark cannot then disagree: both are in the same commit, or neither is.
`Dataset.write_iceberg` would commit from Ray's write, before the rows check, and a retry of
a killed run could not tell which of its commits landed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raycls.config import InputSpec, OutputSpec
from raycls.errors import InputError, SpecError
from raycls.lake import load_catalog
from raycls.prompting.prompts import template_columns

PROP_SOURCE = "raycls.source"
PROP_SNAPSHOT = "raycls.source-snapshot"
PROP_FROM = "raycls.from-snapshot"
PROP_FINGERPRINT = "raycls.fingerprint"
PROP_ROWS = "raycls.rows"
PROP_MODE = "raycls.mode"
PROP_PER_SNAPSHOT = "raycls.source-snapshots"


@dataclass(frozen=True)
class IcebergInput:
    """A planned Iceberg scan: what `raycls.inputs.datasource.InputFiles` is for a folder of files."""

    url: str
    """`iceberg:<table>`, how messages name the input."""
    snapshot_id: int | None
    """The snapshot read (None: the table has none yet)."""
    from_snapshot: int | None
    """Exclusive start of an incremental append range; None for a whole-table read."""
    tasks: tuple = field(compare=False)
    metadata: Any = field(compare=False)
    io: Any = field(compare=False)
    projected: Any = field(compare=False)
    """The projected PyIceberg schema."""
    row_filter: Any = field(compare=False)
    format: str = "iceberg"

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(task.file.file_path for task in self.tasks)

    @property
    def rows_planned(self) -> int:
        """Rows in the planned data files, from the manifests (before a row filter)."""
        return sum(task.file.record_count for task in self.tasks)

    def arrow_schema(self) -> pa.Schema:
        from pyiceberg.io.pyarrow import schema_to_pyarrow

        return schema_to_pyarrow(self.projected, include_field_ids=False)


def open_table(spec: InputSpec):
    """The input table from its catalog; a missing one is a SpecError naming `input.table`."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    catalog = load_catalog(spec.catalog, "input.catalog")
    try:
        return catalog.load_table(spec.table)
    except (NoSuchTableError, NoSuchNamespaceError):
        raise SpecError("input.table", f"no table {spec.table!r} in the Iceberg catalog {catalog.name!r}") from None
    except Exception as exc:
        raise SpecError("input.catalog", f"cannot reach the Iceberg catalog {catalog.name!r} to load {spec.table!r}: {type(exc).__name__}") from None


def needed_columns(spec: InputSpec) -> list[str] | None:
    """The columns a job reads, or None for all (no `keep_columns`: every column is kept)."""
    if spec.keep_columns is None:
        return None
    wanted = [*template_columns(spec.text), spec.id_column, spec.gold_column, *spec.keep_columns]
    return list(dict.fromkeys(c for c in wanted if c))


def _check_columns(spec: InputSpec, table, schema) -> None:
    names = [f.name for f in schema.fields]
    checks = [("input.id_column", [spec.id_column]), ("input.gold_column", [spec.gold_column]),
              ("input.text", template_columns(spec.text)), ("input.keep_columns", spec.keep_columns or [])]
    for key, columns in checks:
        missing = [c for c in columns if c and c not in names]
        if missing:
            raise SpecError(key, f"no column {missing[0]!r} in the Iceberg table {spec.table}; its columns are {names}")


def _row_filter(spec: InputSpec, schema):
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.expressions.parser import parse
    from pyiceberg.expressions.visitors import bind

    if not spec.row_filter:
        return AlwaysTrue()
    try:
        expression = parse(spec.row_filter)
        bind(schema, expression, case_sensitive=True)
    except Exception as exc:
        raise SpecError("input.row_filter", f"not a filter over the table's columns: {type(exc).__name__}: {str(exc)[:200]}") from None
    return expression


def plan(spec: InputSpec, table=None, snapshot_id: int | None = None, from_exclusive: int | None = None,
         incremental: bool = False, history: list[dict[str, Any]] | None = None) -> IcebergInput:
    """Plan the read: the table at `snapshot_id` (default `input.snapshot`, else the current
    one), or with `incremental` the rows appended after `from_exclusive` up to it. `history`
    (`snapshots_between` of that range) leaves out the append halves of rewrites: the range is
    then read as the runs of plain appends between them."""
    table = table if table is not None else open_table(spec)
    snapshot_id = snapshot_id if snapshot_id is not None else spec.snapshot
    if snapshot_id is not None and table.snapshot_by_id(snapshot_id) is None:
        raise SpecError("input.snapshot", f"table {spec.table} has no snapshot {snapshot_id}")
    current = table.current_snapshot()
    snapshot_id = snapshot_id if snapshot_id is not None else (current.snapshot_id if current else None)
    schema = table.schemas().get(table.snapshot_by_id(snapshot_id).schema_id) if snapshot_id is not None else None
    schema = schema or table.schema()
    _check_columns(spec, table, schema)
    row_filter = _row_filter(spec, schema)
    columns = tuple(needed_columns(spec) or ("*",))
    tasks: tuple = ()
    if snapshot_id is not None:
        if incremental:
            ranges = _append_runs(history, from_exclusive) if history is not None else [(from_exclusive, snapshot_id)]
            scans = [table.incremental_append_scan(from_snapshot_id_exclusive=lo, to_snapshot_id_inclusive=hi,
                                                   row_filter=row_filter, selected_fields=columns) for lo, hi in ranges]
        else:
            scans = [table.scan(row_filter=row_filter, selected_fields=columns, snapshot_id=snapshot_id)]
        tasks = tuple(task for scan in scans for task in scan.plan_files())
        projected = scans[0].projection() if scans else (schema if columns == ("*",) else schema.select(*columns))
    else:
        projected = schema if columns == ("*",) else schema.select(*columns)
    return IcebergInput(f"iceberg:{spec.table}", snapshot_id, from_exclusive if incremental else None, tasks,
                        table.metadata, table.io, projected, row_filter)


def _append_runs(history: list[dict[str, Any]], start: int | None) -> list[tuple[int | None, int]]:
    """The (exclusive start, inclusive end) snapshot ranges of consecutive plain appends in `history`."""
    runs, previous = [], start
    for entry in history:
        if is_append(entry):
            if runs and runs[-1][1] == previous:  # continues the run that ended just before it
                runs[-1] = (runs[-1][0], entry["snapshot"])
            else:
                runs.append((previous, entry["snapshot"]))
        previous = entry["snapshot"]
    return runs


def check_input(spec: InputSpec, planned: IcebergInput) -> pa.Schema:
    """The input's Arrow schema (columns were checked when planned)."""
    return planned.arrow_schema()


def _scan(planned: IcebergInput, tasks: Iterable, projected=None) -> Iterable[pa.Table]:
    from pyiceberg.io.pyarrow import ArrowScan, schema_to_pyarrow

    projected = projected or planned.projected
    target = schema_to_pyarrow(projected, include_field_ids=False)
    scanner = ArrowScan(table_metadata=planned.metadata, io=planned.io, row_filter=planned.row_filter,
                        projected_schema=projected, case_sensitive=True)
    for task in tasks:
        yield scanner.to_table([task]).cast(target)


class IcebergDatasource(Datasource):
    """One read task per planned data file; each yields its rows with the `id` column first."""

    def __init__(self, spec: InputSpec, planned: IcebergInput, limit: int | None = None):
        super().__init__()
        from raycls.inputs.ids import plan_renames

        self._spec, self._planned, self._limit = spec, planned, limit
        ids = [pa.concat_tables(list(_scan(planned, [task], planned.projected.select(spec.id_column)))).column(0).combine_chunks()
               .cast(pa.string()) for task in planned.tasks]
        plan_renames(spec, planned.url, list(planned.files), ids)  # duplicates refused before any model call
        self._rows = [len(a) for a in ids]

    def get_name(self) -> str:
        return "RayclsIceberg"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(int(task.file.file_size_in_bytes) * 4 for task in self._planned.tasks) or None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        from raycls.inputs.datasource import _with_ids
        from raycls.inputs.readers import ReadOptions

        planned, id_column = self._planned, self._spec.id_column
        text_columns = ReadOptions.from_spec(self._spec).text_columns
        left = self._limit
        read_tasks = []
        for task, rows in zip(planned.tasks, self._rows):
            if left is not None and left <= 0:
                break
            cap = None if left is None or rows <= left else left
            left = None if left is None else left - rows

            def read(task=task, cap=cap) -> Iterable[pa.Table]:
                for table in _scan(planned, [task]):
                    if table.num_rows:
                        table = _with_ids(table, task.file.file_path, id_column, None, text_columns)
                        yield table if cap is None else table.slice(0, cap)

            meta = BlockMetadata(num_rows=rows if cap is None else cap, size_bytes=None, exec_stats=None,
                                 input_files=(task.file.file_path,))
            read_tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return read_tasks


# --- the history of a table: which snapshots are appends --------------------------------------


def snapshots_between(table, from_exclusive: int | None, to_inclusive: int) -> list[dict[str, Any]]:
    """The snapshots after `from_exclusive` up to `to_inclusive`, oldest first, with their
    operation, added rows and `part_of` (see `rewrite_of`). When `from_exclusive` is not an
    ancestor (the snapshot was expired, or the table rolled back past it) the first entry's
    operation is "missing"."""
    chain, snapshot = [], table.snapshot_by_id(to_inclusive)
    while snapshot is not None and snapshot.snapshot_id != from_exclusive:
        summary = snapshot.summary
        chain.append({"snapshot": snapshot.snapshot_id, "operation": str(summary.operation.value) if summary else "unknown",
                      "added_rows": int(summary.get("added-records") or 0) if summary else 0,
                      "part_of": rewrite_of(table, snapshot)})
        snapshot = table.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id is not None else None
    if from_exclusive is not None and snapshot is None:
        chain.append({"snapshot": from_exclusive, "operation": "missing", "added_rows": 0, "part_of": None})
    return chain[::-1]


def is_append(entry: dict[str, Any]) -> bool:
    """A history entry whose rows are new: an append, and not the append half of a rewrite."""
    return entry["operation"] == "append" and not entry.get("part_of")


def rewrite_of(table, snapshot) -> int | None:
    """The delete/overwrite snapshot whose rewrite `snapshot` is the append half of, else None.

    PyIceberg commits `overwrite` (and the update part of `upsert`) as a delete or overwrite
    snapshot followed by an append snapshot holding the rows written, both in one table
    commit. That append's summary reads like any append, yet its rows are the rewrite's, not
    new ones (a Java/Spark overwrite is a single `overwrite` snapshot, whose added files an
    incremental append read leaves out too). What tells it apart is the commit: its parent
    was never the table's state. Each commit's metadata records its last snapshot's timestamp
    as `last-updated-ms`, and the metadata log keeps that of every earlier commit, so a parent
    whose timestamp is none of them was made inside the same commit. Older than the metadata
    log reaches (`write.metadata.previous-versions-max`, default 100 commits) this cannot be
    told, and the append counts as new: its rows are labelled rather than missed."""
    summary = snapshot.summary
    parent = table.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id is not None else None
    if summary is None or summary.operation.value != "append" or parent is None or parent.summary is None:
        return None
    if parent.summary.operation.value not in ("delete", "overwrite"):
        return None
    metadata = table.metadata
    log = [entry.timestamp_ms for entry in metadata.metadata_log]
    if parent.timestamp_ms <= min(log, default=metadata.last_updated_ms):
        return None  # before the metadata log: unknown
    committed_alone = parent.timestamp_ms in {*log, metadata.last_updated_ms}
    # A commit's metadata file is written before the next commit starts: two commits cannot share a millisecond.
    if committed_alone and parent.timestamp_ms != snapshot.timestamp_ms:
        return None
    return parent.snapshot_id


# --- the labels table ---------------------------------------------------------------------------


def labels_catalog(output: OutputSpec, source: InputSpec):
    props, where = (output.catalog, "output.catalog") if output.catalog is not None else (
        (source.catalog, "input.catalog") if source.format == "iceberg" else (None, "output.catalog"))
    return load_catalog(props, where)


def load_labels(output: OutputSpec, source: InputSpec):
    """The labels table, or None when it does not exist yet."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        return labels_catalog(output, source).load_table(output.table)
    except (NoSuchTableError, NoSuchNamespaceError):
        return None


def watermark(labels, source: str) -> dict[str, Any] | None:
    """The newest commit of `source`'s labels: the labels snapshot's raycls properties
    (walking back from the current snapshot), or None when no run committed yet."""
    if labels is None:
        return None
    snapshot = labels.current_snapshot()
    while snapshot is not None:
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        if props.get(PROP_SOURCE) == source and PROP_SNAPSHOT in props:
            return commit_record(snapshot)
        snapshot = labels.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id is not None else None
    return None


def commit_record(snapshot) -> dict[str, Any]:
    props = snapshot.summary.additional_properties
    return {"source": props.get(PROP_SOURCE), "snapshot": int(props[PROP_SNAPSHOT]),
            "from": int(props[PROP_FROM]) if props.get(PROP_FROM) else None, "rows": int(props.get(PROP_ROWS) or 0),
            "mode": props.get(PROP_MODE), "fingerprint": props.get(PROP_FINGERPRINT),
            "per_snapshot": json.loads(props.get(PROP_PER_SNAPSHOT) or "{}"), "labels_snapshot": snapshot.snapshot_id,
            "committed_at_ms": snapshot.timestamp_ms}


def history(labels, source: str) -> list[dict[str, Any]]:
    """Every commit of `source`'s labels still in the table's history, oldest first."""
    found, snapshot = [], labels.current_snapshot() if labels is not None else None
    while snapshot is not None:
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        if props.get(PROP_SOURCE) == source and PROP_SNAPSHOT in props:
            found.append(commit_record(snapshot))
        snapshot = labels.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id is not None else None
    return found[::-1]


class CommitConflict(InputError):
    """Another run moved the watermark since this one planned its range."""


def commit_labels(output: OutputSpec, source_spec: InputSpec, rows: pa.Table, props: dict[str, str],
                  expected: int | None, replace: bool = False) -> int:
    """Append `rows` (or replace the table's rows, for `replace`) in one commit carrying `props`;
    returns the new labels snapshot. The table is created on first use with `rows`' schema.
    Refuses with CommitConflict when the watermark is no longer `expected` (an optimistic
    check on top of the output lease; PyIceberg's own commit also fails on a concurrent one)."""
    from pyiceberg.exceptions import CommitFailedException

    catalog = labels_catalog(output, source_spec)
    labels = load_labels(output, source_spec)
    if labels is None:
        namespace = tuple(output.table.split(".")[:-1])
        if namespace:
            catalog.create_namespace_if_not_exists(namespace)
        labels = catalog.create_table_if_not_exists(output.table, schema=rows.schema)
    now = watermark(labels, props[PROP_SOURCE])
    if (now["snapshot"] if now else None) != expected:
        raise CommitConflict(output.table, f"another run committed labels up to snapshot {now and now['snapshot']} meanwhile; "
                                           "this run's labels are discarded")
    try:
        if replace:
            labels.overwrite(rows, snapshot_properties=props)
        else:
            labels.append(rows, snapshot_properties=props)
    except CommitFailedException as exc:
        raise CommitConflict(output.table, f"the commit lost to a concurrent one ({exc}); this run's labels are discarded") from None
    return labels.current_snapshot().snapshot_id
