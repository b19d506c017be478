"""Duplicate ids, found before any model call by one pass over the id column alone.

Resume (Ray's checkpoint is keyed by id) and "every input row exactly once" both need ids
that are unique, so a repeated `input.id_column` value is found before the job starts:
each file's ids are read (Parquet reads that column alone) in a Ray task of their own when
Ray runs and there are several files, else here, and Arrow counts them on the driver
(about 12 bytes per id: 1M ids is ~12 MB; `BENCHMARKS.md` has the timing).

What a duplicate does is `input.duplicate_ids`:
- `error` (default): an `InputError` giving how many ids repeat and a few of them;
- `suffix`: the second, third... occurrence in file order (files sorted, rows in order)
  become `<id>#2`, `<id>#3`, skipping any that already exist, so a rerun derives the
  same ids and resume works; every row is labelled;
- `keep_first`: the same suffixed ids, and the later rows are flagged
  `error = duplicate_id` (no model call; rows out = rows in).

Derived ids (no `id_column`) need no pass: `<file>:<row>` cannot repeat (see `io._with_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from raycls.config import InputSpec
from raycls.errors import InputError, RayclsError, excerpt
from raycls.inputs.readers import ReadOptions

EXAMPLES = 3
"""How many repeated ids an error message names."""


@dataclass(frozen=True)
class Renames:
    """The rows of one file whose id changes: row numbers (in the file), their new ids."""

    rows: tuple[int, ...]
    ids: tuple[str, ...]
    flagged: bool
    """Whether these rows are flagged `duplicate_id` (the `keep_first` policy)."""


def duplicate_renames(spec: InputSpec, files, options: ReadOptions | None = None) -> dict[str, Renames]:
    """{file: Renames} for the rows whose id must change; {} when ids are derived or unique.

    Raises `InputError` when ids repeat and `input.duplicate_ids` is `error`, or when an id
    is null or empty.
    """
    if not spec.id_column:
        return {}
    per_file = scan_ids(files, options or ReadOptions.from_spec(spec))
    return plan_renames(spec, files.url, list(files.files), per_file)


def scan_ids(files, options: ReadOptions) -> list[pa.Array]:
    """Each file's ids as a string array, in file order (Ray tasks when Ray runs)."""
    import ray

    if ray.is_initialized() and files.shared and len(files.files) > 1:
        task = ray.remote(num_cpus=1, max_retries=0)(file_ids)
        refs = [task.remote(files, path, options) for path in files.files]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, RayclsError):
                raise exc.cause from None  # one clean line, not the worker's traceback
            raise
    return [file_ids(files, path, options) for path in files.files]


def file_ids(files, path: str, options: ReadOptions) -> pa.Array:
    """The ids of one file, normalised to strings; an error for a missing, null or empty id."""
    from raycls.inputs.readers import read_table

    name = options.id_column
    table = read_table(files.fs, path, files.format, options=options, columns=[name])
    if table.num_rows == 0:
        return pa.array([], pa.string())
    if name not in table.column_names:
        raise InputError(path, f"no id column {name!r} (input.id_column); the columns are {excerpt(table.column_names, 200)}")
    ids = table.column(name).combine_chunks()
    missing = pc.or_kleene(pc.is_null(ids), pc.equal(ids, "")).fill_null(True)
    if pc.any(missing).as_py():
        first = pc.index(missing, True).as_py()
        raise InputError(path, f"id column {name!r} is null or empty on {pc.sum(missing).as_py()} row(s), the first is row {first} "
                         "(0-based, header and blank lines not counted); ids must be present and unique")
    return ids


def plan_renames(spec: InputSpec, where: str, paths: list[str], per_file: list[pa.Array]) -> dict[str, Renames]:
    """Apply `input.duplicate_ids` to the ids of `paths` (in that order)."""
    all_ids = pa.chunked_array(per_file, pa.string())
    counts = pc.value_counts(all_ids) if len(all_ids) else pa.array([], pa.struct([("values", pa.string()), ("counts", pa.int64())]))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return {}
    if spec.duplicate_ids == "error":
        extra = pc.sum(repeated.field("counts")).as_py() - len(repeated)
        shown = ", ".join(f"{excerpt(v, 40)} ({n} times)" for v, n in zip(repeated.field("values")[:EXAMPLES].to_pylist(), repeated.field("counts")[:EXAMPLES].to_pylist()))
        raise InputError(where, f"input.id_column {spec.id_column!r}: {len(repeated)} id(s) occur more than once ({extra} repeated row(s)), "
                         f"e.g. {shown}. Ids must be unique (resume and rows out = rows in are keyed by them): fix the input, or set "
                         "input.duplicate_ids to suffix (later rows become <id>#2, #3, ... and are labelled) or keep_first (later rows are flagged duplicate_id)")
    values = repeated.field("values")
    taken = set(pc.filter(all_ids, pc.match_substring(all_ids, "#")).to_pylist())  # only these can look like a suffixed id
    seen: dict[str, int] = {}
    plan: dict[str, Renames] = {}
    for path, ids in zip(paths, per_file):
        mask = pc.is_in(ids, value_set=values)
        rows, new = [], []
        for row, value in zip(pc.indices_nonzero(mask).to_pylist(), ids.filter(mask).to_pylist()):
            n = seen.get(value, 0) + 1
            if n > 1:
                while f"{value}#{n}" in taken:
                    n += 1
                taken.add(f"{value}#{n}")
                rows.append(row)
                new.append(f"{value}#{n}")
            seen[value] = n
        if rows:
            plan[path] = Renames(tuple(rows), tuple(new), flagged=spec.duplicate_ids == "keep_first")
    return plan
