"""Reading inputs and writing annotated Parquet.

Inputs are Parquet, JSONL or CSV files (a file, a directory or a glob) on any fsspec
filesystem. They are read through a Ray Data datasource of our own, one read task per
file, so that every row gets a stable id while it is read: the `id_column` when the
spec names one, else `<file relative to the input root>:<row number>`, which a rerun
derives again identically. Ids must exist at the read for Ray Data's checkpoint filter
to skip finished rows on resume. Parsing one file (compression, encoding, column types) is
`raycls.inputs.readers`; the pass over the ids that finds duplicates is `raycls.inputs.ids`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from fsspec.core import url_to_fs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raycls import schema
from raycls.config import InputSpec
from raycls.errors import InputError
from raycls.prompting.prompts import template_columns
from raycls.inputs.readers import ReadOptions, read_table, split_name

if TYPE_CHECKING:
    from raycls.inputs.ids import Renames

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
PREFLIGHT_SCAN_BYTES = 256 * 1024**2
"""JSONL and CSV inputs up to this size are parsed in full before the job starts, so a
malformed line is reported before any model loads; larger inputs are checked as they are
read (with an `id_column`, the id pass parses every file whatever the size)."""
_LOCAL_ONLY_PROTOCOLS = ("memory",)
_EXPANSION = {"parquet": 4.0, "jsonl": 1.2, "csv": 1.5}
"""In-memory bytes per file byte, roughly (compressed files another 4x): for block sizing only."""


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
    sizes: Mapping[str, int] = field(default_factory=dict, compare=False)
    """Bytes of each file, as listed (files missing here are of unknown size)."""

    @property
    def shared(self) -> bool:
        """Whether other processes (Ray workers) can open these paths."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return not any(p in _LOCAL_ONLY_PROTOCOLS for p in protocols)


def resolve_input(spec: InputSpec) -> InputFiles:
    """List the files behind `input.path`; errors name the path and what was found.
    (Lake tables are planned by `raycls.lake`; `raycls.inputs.sources` picks which.)"""
    try:
        fs, path = url_to_fs(spec.path)
    except (ValueError, ImportError) as exc:
        raise InputError(spec.path, f"cannot open this location: {exc}") from None
    if any(ch in path for ch in "*?["):
        listed = {f: i for f, i in fs.glob(path, detail=True).items() if i.get("type") == "file"}
        root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        listed = {f: i for f, i in fs.find(path, detail=True).items() if not posixpath.basename(f).startswith(("_", "."))}
        root = path
    elif fs.isfile(path):
        listed, root = {path: fs.info(path)}, posixpath.dirname(path)
    else:
        raise InputError(spec.path, "no such file or directory")
    files = sorted(listed)
    sizes = {f: int(i["size"]) for f, i in listed.items() if isinstance(i.get("size"), int)}
    fmt = spec.format
    if fmt is None:
        exts = {FORMATS.get(split_name(f)[0]) for f in files}
        if len(exts) != 1 or None in exts:
            raise InputError(spec.path, f"cannot infer input.format from the file extensions {sorted({split_name(f)[0] or posixpath.splitext(f)[1] for f in files})}; set input.format to parquet, jsonl or csv")
        fmt = exts.pop()
    if not files:
        raise InputError(spec.path, f"no {fmt} files found")
    return InputFiles(spec.path, root, tuple(files), fmt, fs, sizes)


def check_input(spec: InputSpec, files: InputFiles) -> pa.Schema:
    """Fail early on what would fail later: missing columns, malformed lines (small inputs)."""
    options = ReadOptions.from_spec(spec)
    first = read_table(files.fs, files.files[0], files.format, options=options)
    needed = template_columns(spec.text) + [c for c in (spec.id_column, spec.gold_column) if c] + list(spec.keep_columns or [])
    missing = [c for c in needed if c not in first.column_names]
    if missing:
        raise InputError(files.files[0], f"missing column(s) {missing}; the columns are {first.column_names}")
    if files.format in ("jsonl", "csv") and files.shared:
        total = sum(files.fs.size(f) or 0 for f in files.files[1:])
        if total <= PREFLIGHT_SCAN_BYTES:
            for path in files.files[1:]:
                _check_types(first, read_table(files.fs, path, files.format, options=options), files.files[0], path)
    return first.drop_columns([c for c in (schema.READ_ERROR,) if c in first.column_names]).schema


def _check_types(first: pa.Table, table: pa.Table, first_path: str, path: str) -> None:
    """A column copied to the output must fit the type the first file gave it (the output's type)."""
    for name in set(first.column_names) & set(table.column_names) - {schema.READ_ERROR}:
        want, got = first.schema.field(name).type, table.schema.field(name).type
        if want == got or pa.types.is_null(got):
            continue
        try:
            table.column(name).cast(want)
        except (pa.ArrowException, ValueError):
            raise InputError(path, f"column {name!r} holds {got} values here but {want} in {posixpath.basename(first_path)}, "
                             "the type the output takes; leave it out of input.keep_columns or make the files agree") from None


def _with_ids(table: pa.Table, relpath: str, id_column: str | None, renames: Renames | None = None, text_columns: tuple[str, ...] = ()) -> pa.Table:
    """The file's rows with `id` first: the id column (duplicates renamed per `renames`) or derived ids.

    Derived ids `<relpath>:<row>` cannot collide: relpaths are unique under the root and the
    row number after the last `:` is an integer, so the id names one (file, row) only.
    A text column that this file lacks is added as nulls (its rows are flagged `empty_text`).
    """
    if id_column:
        ids = table.column(id_column).cast(pa.string())
        if ids.null_count:
            raise InputError(relpath, f"id column {id_column!r} has {ids.null_count} null value(s); ids must be unique and present")
        if renames:
            ids, table = _renamed(ids, table, renames)
    else:
        ids = pa.array([f"{relpath}:{i}" for i in range(table.num_rows)], pa.string())
    for column in text_columns:
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
    table = table.rename_columns([schema.stored_name(c) if c != schema.READ_ERROR else c for c in table.column_names])
    return table.add_column(0, schema.ID, ids)


def _renamed(ids: pa.ChunkedArray, table: pa.Table, renames: Renames) -> tuple[pa.Array, pa.Table]:
    values = ids.to_pylist()
    for row, new in zip(renames.rows, renames.ids):
        values[row] = new
    if renames.flagged:
        codes = table.column(schema.READ_ERROR).to_pylist() if schema.READ_ERROR in table.column_names else [None] * table.num_rows
        for row in renames.rows:
            codes[row] = codes[row] or schema.DUPLICATE_ID
        flags = pa.array(codes, pa.string())
        if schema.READ_ERROR in table.column_names:
            table = table.set_column(table.schema.get_field_index(schema.READ_ERROR), schema.READ_ERROR, flags)
        else:
            table = table.append_column(schema.READ_ERROR, flags)
    return pa.array(values, pa.string()), table


class InputDatasource(Datasource):
    """One read task per input file; each yields the file's rows with their ids."""

    def __init__(self, spec: InputSpec, files: InputFiles, limit: int | None = None):
        super().__init__()
        from raycls.inputs.ids import duplicate_renames

        self._id_column = spec.id_column
        self._files = files
        self._limit = limit
        self._options = ReadOptions.from_spec(spec)
        self._renames = duplicate_renames(spec, files, self._options)  # before any model call

    def get_name(self) -> str:
        return "RayclsInput"

    def estimate_inmemory_data_size(self) -> int | None:
        """Roughly the bytes the rows take in memory, from the files' sizes: what Ray Data sizes
        its blocks by (without it, a small input is split into 200 blocks of a few rows, and
        every step pays a task per block)."""
        sizes = [self._files.sizes.get(path) for path in self._files.files]
        if not sizes or None in sizes:
            return None
        return int(sum(size * _EXPANSION.get(self._files.format, 1.0) * (4.0 if split_name(path)[1] else 1.0)
                       for path, size in zip(self._files.files, sizes)))

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        caps = limit_rows(self._files, self._limit) if self._limit else {path: None for path in self._files.files}
        return [
            ReadTask(
                _read_fn(self._files, path, self._id_column, cap, self._options, self._renames.get(path)),
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
    if files.format == "parquet" and split_name(path)[1] is None:
        with files.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    return read_table(files.fs, path, files.format).num_rows


def _read_fn(files: InputFiles, path: str, id_column: str | None, cap: int | None = None,
             options: ReadOptions | None = None, renames: Renames | None = None):
    relpath = posixpath.relpath(path, files.root) if files.root else path
    fs, fmt = files.fs, files.format
    # A process-local filesystem (memory://) cannot be opened by Ray workers: ship the bytes.
    data = None if files.shared else fs.cat_file(path)
    fs = fs if files.shared else None

    options = options or ReadOptions()

    def read() -> Iterable[pa.Table]:
        table = read_table(fs, path, fmt, data, options)
        if table.num_rows == 0:  # an empty file adds no rows (and no block without the text column)
            return
        table = _with_ids(table, relpath, id_column, renames, options.text_columns)
        yield table if cap is None else table.slice(0, cap)

    return read


def read_rows(spec: InputSpec):
    """The input files as a Ray Dataset with a stable string `id` column first."""
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
