"""Delta Lake tables as input: a version, or the files appended between two versions.

A Delta table's data files are plain Parquet, so a planned read is an `InputFiles` (the
table root and the files to read) that the file reader (`raycls.inputs.datasource.InputDatasource`)
reads as any folder of Parquet, ids from `input.id_column`. Which files: at a version,
the live files `deltalake` lists (`DeltaTable(path, version=v).file_uris()`); for
`label-new`, the `add` actions of the commits after the watermark version, read straight
from `_delta_log/<version>.json`, classified by their actions: a commit that adds files and
removes none (with `dataChange`) is an append; anything else (an overwrite, a delete, a
merge, an `OPTIMIZE` compaction) is a rewrite, which `incremental.on_rewrite` decides.

Not supported (refused when the table is opened, naming what): deletion vectors and column
mapping (the files alone would not give the table's rows), and partitioned tables (the
partition columns live in the log, not in the files).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any
from urllib.parse import unquote

from fsspec.core import url_to_fs

from raycls import storage
from raycls.config import InputSpec
from raycls.errors import InputError, SpecError
from raycls.inputs.datasource import InputFiles

_UNSUPPORTED = ("deletionVectors", "columnMapping")


def open_table(spec: InputSpec, version: int | None = None):
    """The `deltalake.DeltaTable` at `version` (default `input.version`, else the latest)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    version = version if version is not None else spec.version
    try:
        table = DeltaTable(storage.absolute(spec.path), version=version, storage_options=_storage_options(spec.path))
    except TableNotFoundError:
        raise SpecError("input.path", f"no Delta table at {spec.path} (no _delta_log there)") from None
    except Exception as exc:  # a version that does not exist, an unreachable store
        key = "input.version" if version is not None else "input.path"
        raise SpecError(key, f"cannot open the Delta table {spec.path} at version {version}: {type(exc).__name__}: {str(exc)[:200]}") from None
    features = set(table.protocol().reader_features or ())
    if features & set(_UNSUPPORTED):
        raise SpecError("input.path", f"the Delta table uses {sorted(features & set(_UNSUPPORTED))}, which raycls does not read yet")
    if table.metadata().partition_columns:
        raise SpecError("input.path", f"partitioned Delta tables (by {table.metadata().partition_columns}) are not supported yet")
    return table


def _storage_options(path: str) -> dict[str, str] | None:
    """delta-rs reads S3 credentials from the environment; an endpoint over http needs saying so."""
    import os

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if path.startswith("s3://") and endpoint and endpoint.startswith("http://"):
        return {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}
    return None


def latest_version(spec: InputSpec) -> int:
    return int(open_table(spec, spec.version).version())


def _files(spec: InputSpec, paths: list[str]) -> InputFiles:
    fs, root = url_to_fs(storage.absolute(spec.path))
    return InputFiles(spec.path, root.rstrip("/"), tuple(paths), "parquet", fs, {})


def plan_version(spec: InputSpec, version: int | None) -> InputFiles:
    """Every live file of the table at `version`."""
    table = open_table(spec, version)
    return _files(spec, sorted(url_to_fs(uri)[1] for uri in table.file_uris()))


def _commit(spec: InputSpec, version: int) -> list[dict[str, Any]]:
    fs, root = url_to_fs(storage.absolute(spec.path))
    path = posixpath.join(root, "_delta_log", f"{version:020d}.json")
    try:
        with fs.open(path, "rb") as f:
            return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise InputError(path, f"the Delta log entry of version {version} is gone (log retention); "
                               "label the table whole again (incremental.on_rewrite: relabel)") from None


def versions_between(spec: InputSpec, from_exclusive: int | None, to_inclusive: int) -> list[dict[str, Any]]:
    """The versions after `from_exclusive` up to `to_inclusive`, oldest first: operation,
    whether it is an append, the files it added and the rows it says it wrote."""
    found = []
    for version in range(0 if from_exclusive is None else from_exclusive + 1, to_inclusive + 1):
        actions = _commit(spec, version)
        info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
        adds = [a["add"] for a in actions if "add" in a and a["add"].get("dataChange", True)]
        removes = [a["remove"] for a in actions if "remove" in a and a["remove"].get("dataChange", True)]
        rewrites = [a for a in actions if ("add" in a and not a["add"].get("dataChange", True))]
        append = not removes and not rewrites
        metrics = info.get("operationMetrics") or {}
        found.append({"snapshot": version, "operation": "append" if append else str(info.get("operation", "rewrite")).lower(),
                      "added_rows": int(metrics.get("numOutputRows") or metrics.get("num_added_rows") or 0),
                      "files": [unquote(a["path"]) for a in adds]})
    return found


def plan_appended(spec: InputSpec, history: list[dict[str, Any]]) -> InputFiles:
    """The files the append versions of `history` added (rewrites are left out)."""
    _, root = url_to_fs(storage.absolute(spec.path))
    rels = [rel for entry in history if entry["operation"] == "append" for rel in entry["files"]]
    return _files(spec, [rel if "://" in rel else posixpath.join(root, rel) for rel in rels])
