"""The project's error classes.

A handful of them, each raised where the problem is found and turned into a CLI
message only in `raycls.cli`. Every one says what was expected and what was seen.
"""

from __future__ import annotations


class RayclsError(Exception):
    """Base class: anything raycls raises on purpose."""


class SpecError(RayclsError):
    """The job spec is invalid. `key` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class InputError(RayclsError):
    """The input data is unusable: a missing file or column, a malformed line.

    `path` names the file, `line` the 1-based line when there is one.
    """

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class ResumeError(RayclsError):
    """An output location holds a run that this run must not continue or overwrite."""


class BackendError(RayclsError):
    """A fatal backend failure: the run cannot go on (no usable key, engine died)."""


class RowCountError(RayclsError):
    """The ids written are not exactly the ids read: the run must not be marked finished."""

    def __init__(self, rows_read: int, rows_written: int, missing: list[str], extra: list[str], repeated: list[str]):
        self.rows_read, self.rows_written = rows_read, rows_written
        self.missing, self.extra, self.repeated = missing, extra, repeated
        parts = [f"{len(missing)} missing", f"{len(extra)} not in the input", f"{len(repeated)} written more than once"]
        examples = "; ".join(f"{name} e.g. {', '.join(repr(i[:60]) for i in ids[:5])}"
                             for name, ids in (("missing", missing), ("extra", extra), ("repeated", repeated)) if ids)
        super().__init__(
            f"rows out != rows in: read {rows_read}, written {rows_written} ({', '.join(parts)}; {examples}). "
            "The output is not marked finished: run the same command again to label the missing rows"
        )
