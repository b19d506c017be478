"""Batch mode's durable state, under `<output>/_raycls_batches/`: what was uploaded and
submitted, and what came back. Written before the job waits, so a run that is killed and
started again polls the same batches and never uploads or pays for a row twice.

- `job.json`: the provider (base URL, endpoint) and the key *references* of the spec, so
  `raycls status` and `raycls cancel` can reach the batches with only `--output`.
- `batches/<name>.json`, one per batch file: its rows (ids and attempt numbers, in request
  order), estimated tokens, the *label* of the key that owns it (never the key), and as
  they happen its `file_id`, `batch_id`, last seen `status` and `request_counts`,
  `cancel_requested_at`, and `collected` once its results are stored. It is written
  before the upload, after it, and after the batch is created: a kill between upload and
  record leaves at most one orphan file at the provider; one between create and record is
  healed by finding the batch by its metadata (`raycls_batch`).
- `results/<name>.parquet`: the rows parsed from a batch's output and error files: `id`,
  `final` (the row's answer or its last error), `result` (the result columns as JSON), and
  for rows that go to another round their `failures` and `reasks`. Written before the
  record says `collected`, under the batch's name, so collecting twice writes the same file.
- `pending/<pass>/*.parquet`: rows a write pass found without a final result (written by
  the map step, `raycls.backends.api.batch`), read back by the driver to submit.

Plain JSON and Parquet on any fsspec filesystem (`raycls.storage`), like the run manifest.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from raycls import storage

STATE_DIR = "_raycls_batches"
TERMINAL = ("completed", "failed", "expired", "cancelled")
RESULTS_SCHEMA = pa.schema([("id", pa.string()), ("final", pa.bool_()), ("result", pa.string()),
                            ("failures", pa.int64()), ("reasks", pa.string())])
PENDING_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("truncated", pa.bool_())])


@dataclass
class BatchState:
    """The state folder of one output."""

    root: str

    @classmethod
    def of(cls, output: str) -> "BatchState":
        return cls(storage.join(storage.absolute(output).rstrip("/"), STATE_DIR))

    def exists(self) -> bool:
        return storage.read_json(storage.join(self.root, "job.json")) is not None

    def clear(self) -> None:
        storage.remove(self.root, recursive=True)

    # -- job and batch records ---------------------------------------------------------------

    def job(self) -> dict[str, Any] | None:
        return storage.read_json(storage.join(self.root, "job.json"))

    def write_job(self, record: dict[str, Any]) -> None:
        storage.write_json(storage.join(self.root, "job.json"), record)

    def records(self) -> list[dict[str, Any]]:
        """Every batch record, oldest first."""
        folder = storage.join(self.root, "batches")
        names = [n for n in storage.list_names(folder) if n.endswith(".json")]
        return [r for r in (storage.read_json(storage.join(folder, n)) for n in names) if r is not None]

    def save(self, record: dict[str, Any]) -> None:
        storage.write_json(storage.join(self.root, "batches", record["name"] + ".json"), record)

    def next_name(self, records: list[dict[str, Any]]) -> str:
        taken = [int(r["name"][1:]) for r in records]
        return f"b{(max(taken) + 1) if taken else 0:06d}"

    # -- results -------------------------------------------------------------------------------

    def write_results(self, name: str, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
        _write_parquet(table, storage.join(self.root, "results", name + ".parquet"))

    def results(self) -> pa.Table:
        """Every stored result, later batches last (a row's latest word is its last occurrence)."""
        return _read_all(storage.join(self.root, "results"), RESULTS_SCHEMA)

    def latest(self) -> dict[str, dict[str, Any]]:
        """id -> the row's latest result record (final or not), as a dict."""
        table = self.results()
        out: dict[str, dict[str, Any]] = {}
        for row in table.to_pylist():
            if out.get(row["id"], {}).get("final") and not row["final"]:
                continue  # a stale non-final record from a batch collected late
            out[row["id"]] = row
        return out

    # -- pending rows of one write pass ----------------------------------------------------------

    def new_pass(self) -> str:
        return storage.join(self.root, "pending", uuid.uuid4().hex[:12])

    def read_pending(self, pass_url: str) -> pa.Table:
        return _read_all(pass_url, PENDING_SCHEMA)

    def drop_pass(self, pass_url: str) -> None:
        storage.remove(pass_url, recursive=True)


def write_pending(pass_url: str, rows: dict[str, list]) -> None:
    """Called from the map step: the rows of one block that have no final result yet."""
    table = pa.table(rows, schema=PENDING_SCHEMA)
    _write_parquet(table, storage.join(pass_url, uuid.uuid4().hex + ".parquet"))


def summary(state: BatchState) -> dict[str, Any]:
    """What `raycls status` shows: each batch's state and row counts, and totals."""
    records = state.records()
    batches, totals, in_flight = [], {}, 0
    for r in records:
        status = r.get("status") or ("uploaded" if r.get("file_id") else "prepared")
        counts = r.get("request_counts") or {}
        batches.append({"name": r["name"], "batch_id": r.get("batch_id"), "status": status, "key": r.get("key"),
                        "rows": len(r["rows"]), "completed": counts.get("completed", 0), "failed": counts.get("failed", 0),
                        "collected": bool(r.get("collected")), "checked_at": r.get("checked_at")})
        totals[status] = totals.get(status, 0) + 1
        if not r.get("collected") and not r.get("abandoned"):
            in_flight += len(r["rows"])
    final = sum(1 for row in state.latest().values() if row["final"])
    return {"batches": batches, "batches_by_status": totals, "rows_in_flight": in_flight,
            "rows_collected": final}


def _write_parquet(table: pa.Table, url: str) -> None:
    import pyarrow.parquet as pq

    fs, path = storage.fs_path(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    aside = path + ".tmp" if storage.is_local(fs) else path  # local: whole or absent (an object store PUT is)
    with fs.open(aside, "wb") as f:
        pq.write_table(table, f)
    if aside != path:
        fs.mv(aside, path)


def _read_all(url: str, schema: pa.Schema) -> pa.Table:
    import pyarrow.parquet as pq

    names = [n for n in storage.list_names(url) if n.endswith(".parquet")]
    if not names:
        return schema.empty_table()
    fs, path = storage.fs_path(url)
    tables = []
    for name in names:
        with fs.open(posixpath.join(path, name), "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).cast(schema)


def result_json(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))
