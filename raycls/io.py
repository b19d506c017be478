"""Reading inputs and writing annotated Parquet.

Inputs are Parquet, JSONL or CSV files (a file, a directory or a glob) on any fsspec
filesystem. They are read through a Ray Data datasource of our own, one read task per
file, so that every row gets a stable id while it is read: the `id_column` when the
spec names one, else `<file relative to the input root>:<row number>`, which a rerun
derives again identically. Ids must exist at the read for Ray Data's checkpoint filter
to skip finished rows on resume.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Iterable

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray.data
from fsspec.core import url_to_fs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raycls import schema
from raycls.config import InputSpec
from raycls.errors import InputError
from raycls.prompts import template_columns

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
PREFLIGHT_SCAN_BYTES = 256 * 1024**2
"""JSONL inputs up to this size are parsed in full before the job starts, so a malformed
line is reported before any model loads; larger inputs are checked as they are read."""
_LOCAL_ONLY_PROTOCOLS = ("memory",)


@dataclass(frozen=True)
class InputFiles:
    """The files one input path stands for, and how to read them."""

    url: str
    """The path as the user gave it."""
    root: str
    """Directory that derived ids are relative to."""
    files: tuple[str, ...]
    format: str
    fs: fsspec.AbstractFileSystem

    @property
    def shared(self) -> bool:
        """Whether other processes (Ray workers) can open these paths."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return not any(p in _LOCAL_ONLY_PROTOCOLS for p in protocols)


def resolve_input(spec: InputSpec) -> InputFiles:
    """List the files behind `input.path`; errors name the path and what was found."""
    try:
        fs, path = url_to_fs(spec.path)
    except (ValueError, ImportError) as exc:
        raise InputError(spec.path, f"cannot open this location: {exc}") from None
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in fs.glob(path) if fs.isfile(f))
        root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        files = sorted(f for f in fs.find(path) if not posixpath.basename(f).startswith(("_", ".")))
        root = path
    elif fs.isfile(path):
        files, root = [path], posixpath.dirname(path)
    else:
        raise InputError(spec.path, "no such file or directory")
    fmt = spec.format
    if fmt is None:
        exts = {FORMATS.get(posixpath.splitext(f)[1].lower()) for f in files}
        if len(exts) != 1 or None in exts:
            raise InputError(spec.path, f"cannot infer input.format from the file extensions {sorted({posixpath.splitext(f)[1] for f in files})}; set input.format to parquet, jsonl or csv")
        fmt = exts.pop()
    if not files:
        raise InputError(spec.path, f"no {fmt} files found")
    return InputFiles(spec.path, root, tuple(files), fmt, fs)


def read_table(fs: fsspec.AbstractFileSystem, path: str, fmt: str, data: bytes | None = None) -> pa.Table:
    """Read one file into Arrow; a malformed JSONL line is reported with its line number."""
    if data is None:
        with fs.open(path, "rb") as f:
            data = f.read()
    try:
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        if fmt == "csv":
            return pacsv.read_csv(io.BytesIO(data))
    except pa.ArrowException as exc:
        raise InputError(path, f"not a valid {fmt} file: {exc}") from None
    return _read_jsonl(path, data)


def _read_jsonl(path: str, data: bytes) -> pa.Table:
    rows = []
    for number, line in enumerate(data.decode("utf-8", errors="strict").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"malformed JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line", line=number) from None
        if not isinstance(row, dict):
            raise InputError(path, f"expected a JSON object, got {type(row).__name__}", line=number)
        rows.append(row)
    return pa.Table.from_pylist(rows)


def check_input(spec: InputSpec, files: InputFiles) -> pa.Schema:
    """Fail early on what would fail later: missing columns, malformed lines (small inputs)."""
    first = read_table(files.fs, files.files[0], files.format)
    needed = template_columns(spec.text) + [c for c in (spec.id_column, spec.gold_column) if c] + list(spec.keep_columns or [])
    missing = [c for c in needed if c not in first.column_names]
    if missing:
        raise InputError(files.files[0], f"missing column(s) {missing}; the columns are {first.column_names}")
    if files.format == "jsonl" and files.shared:
        total = sum(files.fs.size(f) or 0 for f in files.files[1:])
        if total <= PREFLIGHT_SCAN_BYTES:
            for path in files.files[1:]:
                read_table(files.fs, path, files.format)
    return first.schema


def _with_ids(table: pa.Table, relpath: str, id_column: str | None) -> pa.Table:
    if id_column:
        ids = table.column(id_column).cast(pa.string())
        if ids.null_count:
            raise InputError(relpath, f"id column {id_column!r} has {ids.null_count} null value(s); ids must be unique and present")
    else:
        ids = pa.array([f"{relpath}:{i}" for i in range(table.num_rows)], pa.string())
    table = table.rename_columns([schema.stored_name(c) for c in table.column_names])
    return table.add_column(0, schema.ID, ids)


class InputDatasource(Datasource):
    """One read task per input file; each yields the file's rows with their ids."""

    def __init__(self, spec: InputSpec, files: InputFiles, limit: int | None = None):
        super().__init__()
        self._id_column = spec.id_column
        self._files = files
        self._limit = limit

    def get_name(self) -> str:
        return "RayclsInput"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        caps = limit_rows(self._files, self._limit) if self._limit else {path: None for path in self._files.files}
        return [
            ReadTask(
                _read_fn(self._files, path, self._id_column, cap),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(path,)),
                per_task_row_limit=per_task_row_limit,
            )
            for path, cap in caps.items()
        ]


def limit_rows(files: InputFiles, limit: int) -> dict[str, int | None]:
    """The first `limit` rows in file order, as {file: rows to read from its start}.

    Applied inside the read, before Ray's checkpoint filter, so a resumed `--limit N`
    run finishes the same N rows instead of labelling N more (a `Dataset.limit` after
    the read would count only rows not yet finished).
    """
    caps: dict[str, int | None] = {}
    left = limit
    for path in files.files:
        if left <= 0:
            break
        n = _count_rows(files, path)
        caps[path] = None if n <= left else left
        left -= n
    return caps


def _count_rows(files: InputFiles, path: str) -> int:
    if files.format == "parquet":
        with files.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    return read_table(files.fs, path, files.format).num_rows


def _read_fn(files: InputFiles, path: str, id_column: str | None, cap: int | None = None):
    relpath = posixpath.relpath(path, files.root) if files.root else path
    fs, fmt = files.fs, files.format
    # A process-local filesystem (memory://) cannot be opened by Ray workers: ship the bytes.
    data = None if files.shared else fs.cat_file(path)
    fs = fs if files.shared else None

    def read() -> Iterable[pa.Table]:
        table = read_table(fs, path, fmt, data)
        yield _with_ids(table if cap is None else table.slice(0, cap), relpath, id_column)

    return read


def read_rows(spec: InputSpec):
    """The input as a Ray Dataset with a stable string `id` column first."""
    files = resolve_input(spec)
    check_input(spec, files)
    return ray.data.read_datasource(InputDatasource(spec, files))


def pyarrow_filesystem(url: str):
    """A (pyarrow filesystem, path) pair for any fsspec URL, for Ray's writers and readers."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = url_to_fs(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return None, path
    return PyFileSystem(FSSpecHandler(fs)), path
