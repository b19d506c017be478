"""Lake tables in and out: Apache Iceberg and Delta Lake inputs, an Iceberg labels table.

- `raycls.lake.iceberg`: a table (a pinned or the current snapshot, or the rows appended
  between two snapshots) planned with PyIceberg and read by a Ray Data datasource; the
  labels table (created on first use, one commit per run, the watermark in its snapshot
  properties).
- `raycls.lake.delta`: a Delta table at a version, or the files appended between versions,
  as the input files the file reader already reads.
- `raycls.lake.runs`: `raycls label-new` over a table: label what was appended since the
  watermark, exactly once through kills and overlapping runs.

PyIceberg and deltalake are the `lake` extra; they are imported only when a spec names a table.
This module holds what the spec models need (checks, catalog properties) and nothing heavy.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping

from raycls.errors import SpecError

if TYPE_CHECKING:
    from raycls.config import InputSpec, OutputSpec

TABLE_FORMATS = ("iceberg", "delta")
_SECRET_KEY = re.compile(r"secret|password|token|credential|access-key|private", re.IGNORECASE)
_INPUT_TABLE_ONLY = {"iceberg": ("table", "catalog", "snapshot", "row_filter"), "delta": ("version",)}


def check_input_spec(spec: "InputSpec") -> None:
    """What a table input needs, and table keys on the wrong input; errors name the key."""
    for fmt, keys in _INPUT_TABLE_ONLY.items():
        for key in keys:
            if getattr(spec, key) is not None and spec.format != fmt:
                raise SpecError(f"input.{key}", f"only for input.format: {fmt} (the format is {spec.format or 'inferred from the files'})")
    if spec.format == "iceberg":
        if not spec.table:
            raise SpecError("input.table", "required key is missing: input.format iceberg names its table, e.g. db.news")
        if spec.path is not None:
            raise SpecError("input.path", "an Iceberg input is named by input.table (and its catalog), not a path; remove input.path")
    elif spec.path is None:
        raise SpecError("input.path", "required key is missing")
    if spec.is_table:
        if not spec.id_column:
            raise SpecError("input.id_column", f"required for an input.format {spec.format} table: its rows have no file "
                                               "and row number to derive a stable id from")
        if spec.duplicate_ids != "error":
            raise SpecError("input.duplicate_ids", "a table input's ids must be unique: only 'error' is supported")
    if spec.catalog is not None:
        check_catalog(spec.catalog, "input.catalog")


def check_output_spec(spec: "OutputSpec") -> None:
    if spec.format == "iceberg" and not spec.table:
        raise SpecError("output.table", "required key is missing: output.format iceberg names the labels table, e.g. db.news_labels")
    if spec.format != "iceberg":
        for key in ("table", "catalog"):
            if getattr(spec, key) is not None:
                raise SpecError(f"output.{key}", "only for output.format: iceberg")
    if spec.catalog is not None:
        check_catalog(spec.catalog, "output.catalog")


def check_catalog(props: Mapping[str, Any], where: str) -> None:
    """A secret-looking property must be an `env:`/`file:` reference, never a literal."""
    for key, value in props.items():
        if _SECRET_KEY.search(str(key)) and not _is_reference(value):
            raise SpecError(f"{where}.{key}", "looks like a secret: give it as 'env:VARIABLE' or 'file:PATH', not its value")


def _is_reference(value: Any) -> bool:
    """`env:NAME` or `file:PATH`; a `file://` URL (a warehouse location) is a value, not a reference."""
    return isinstance(value, str) and value.startswith(("env:", "file:")) and not value.startswith("file://") and len(value) > 5


def catalog_properties(props: Mapping[str, Any] | None, where: str) -> tuple[str, dict[str, str]]:
    """(catalog name, properties) with `env:`/`file:` references read, for `load_catalog`.

    None means PyIceberg's own configuration of its default catalog. The values are read
    here, on the driver, when the catalog is opened: they are never logged or recorded."""
    from raycls.backends.api.keys import read_reference

    props = dict(props or {})
    name = str(props.pop("name", "default"))
    resolved = {k: read_reference(v, f"{where}.{k}") if _is_reference(v) else str(v) for k, v in props.items()}
    return name, resolved


def load_catalog(props: Mapping[str, Any] | None, where: str):
    """The PyIceberg catalog a spec names; an unreachable or misconfigured one is a SpecError."""
    from pyiceberg.catalog import load_catalog as pyiceberg_load

    name, resolved = catalog_properties(props, where)
    try:
        return pyiceberg_load(name, **resolved)
    except Exception as exc:  # PyIceberg raises ValueError, NotInstalledError, connection errors...
        how = "the spec's properties" if props else "PyIceberg's configuration (~/.pyiceberg.yaml, PYICEBERG_CATALOG__*)"
        raise SpecError(where, f"cannot open the Iceberg catalog {name!r} from {how}: {type(exc).__name__}: {_redacted(exc, resolved)}") from None


def _redacted(exc: Exception, props: Mapping[str, str]) -> str:
    text = str(exc)
    for key, value in props.items():
        if value and _SECRET_KEY.search(key):
            text = text.replace(value, "<redacted>")
    return text[:300]
