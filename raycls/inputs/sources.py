"""Which source an input is: files (`raycls.inputs.datasource`) or a lake table (`raycls.lake`).

The job plans, checks and reads its input through these three functions, so nothing above
them knows which kind it reads; the file layer below knows nothing of tables.
"""

from __future__ import annotations

import pyarrow as pa
from ray.data.datasource import Datasource

from raycls.inputs import datasource as io
from raycls.config import InputSpec


def resolve_input(spec: InputSpec) -> io.InputFiles:
    """The files behind `input.path`; for a table, an Iceberg scan at its snapshot or the
    files of a Delta version (an `InputFiles` like any folder)."""
    if spec.format == "iceberg":
        from raycls.lake import iceberg

        return iceberg.plan(spec)
    if spec.format == "delta":
        from raycls.lake import delta

        return delta.plan_version(spec, spec.version)
    return io.resolve_input(spec)


def check_input(spec: InputSpec, files) -> pa.Schema:
    """Missing columns and malformed lines, before anything is spent (an Iceberg scan's
    columns were checked when it was planned)."""
    if files.format == "iceberg":
        return files.arrow_schema()
    return io.check_input(spec, files)


def input_source(spec: InputSpec, files, limit: int | None = None) -> Datasource:
    """The datasource that reads `files` with ids: ours for files, `raycls.lake` for an Iceberg scan."""
    if files.format == "iceberg":
        from raycls.lake.iceberg import IcebergDatasource

        return IcebergDatasource(spec, files, limit=limit)
    return io.InputDatasource(spec, files, limit=limit)
