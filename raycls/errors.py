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
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self):  # rebuilt from its fields when it crosses a Ray process boundary
        return type(self), (self.key, self.message)


class InputError(RayclsError):
    """The input data is unusable: a missing file or column, a malformed line.

    `path` names the file, `line` the 1-based line when there is one.
    """

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = path
        self.line = line
        self.message = shorten(message, MAX_MESSAGE)
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {self.message}")

    def __reduce__(self):  # raised in a Ray worker, it must unpickle on the driver
        return type(self), (self.path, self.message, self.line)


class ResumeError(RayclsError):
    """An output location holds a run that this run must not continue or overwrite."""


class LeaseLost(RayclsError):
    """Another run took over the output's lease while this one was writing: this run stopped
    and left the output to the other (the CLI exits 1). `url` is the lease's location."""

    def __init__(self, url: str):
        self.url = url
        super().__init__(f"another run took over the output lease ({url}); this run stopped and left the output "
                         "to it: do not start this one again while it runs")

    def __reduce__(self):
        return type(self), (self.url,)


class BackendError(RayclsError):
    """A fatal backend failure: the run cannot go on (no usable key, engine died)."""


MAX_MESSAGE = 600
"""An input error's message is cut to this many characters: a malformed file must never
print a whole value (a row can hold megabytes) to the terminal."""


def excerpt(value: object, limit: int = 80) -> str:
    """`value` as text of at most about `limit` characters, for quoting in a message.

    Strings are quoted as `repr` does (so control characters show as escapes); a longer
    text keeps its start and says how long it was.
    """
    if not isinstance(value, str):
        return shorten(repr(value), limit)
    shown = repr(value[:limit])
    return shown if len(value) <= limit else f"{shown}… ({len(value)} chars)"


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def user_message(exc: BaseException) -> str:
    """The one-line message of a `RayclsError`, also when Ray wraps it.

    An error raised in a Ray task (a read task, say) reaches the driver as a
    `RayTaskError` that is also an instance of the error's class, but whose `str` is the
    worker's traceback; the CLI prints this instead.
    """
    cause = getattr(exc, "cause", None)
    return str(cause) if isinstance(cause, RayclsError) else str(exc)


class RowCountError(RayclsError):
    """The ids written are not exactly the ids read: the run must not be marked finished."""

    def __init__(self, rows_read: int, rows_written: int, missing: list[str], extra: list[str], repeated: list[str]):
        self.rows_read, self.rows_written = rows_read, rows_written
        self.missing, self.extra, self.repeated = missing, extra, repeated
        parts = [f"{len(missing)} missing", f"{len(extra)} not in the input", f"{len(repeated)} written more than once"]
        examples = "; ".join(f"{name} e.g. {', '.join(excerpt(i, 60) for i in ids[:5])}"
                             for name, ids in (("missing", missing), ("extra", extra), ("repeated", repeated)) if ids)
        super().__init__(
            f"rows out != rows in: read {rows_read}, written {rows_written} ({', '.join(parts)}; {examples}). "
            "The output is not marked finished: run the same command again to label the missing rows"
        )
