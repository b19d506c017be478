"""`raycls label-new` over a lake table: label what was appended since the watermark.

The **watermark** is the last source snapshot (Delta: version) whose rows the output holds.
With `output.format: iceberg` it lives in the labels table itself, in the properties of
the snapshot that committed those labels (`raycls.lake.iceberg`); with Parquet output, in a
commit record `<output>/_raycls_lake/commits/after-<from>.json` per run.

One call:

1. takes the output's lease (`raycls.job.lease`): an overlapping call finds it held, says so
   and exits 0, leaving the range to the run that holds it;
2. reads the watermark and the source's history after it; a snapshot that is not an append
   is handled by `incremental.on_rewrite` (`error` names it, `skip` labels only appends,
   not the rows a rewrite wrote, `relabel` labels the whole table as it is now and replaces
   the labels);
3. labels the range as a normal, resumable raycls run (`pipeline.run_job`) into a staging
   output named by the range, `<output>/_raycls_lake/ranges/<from>-<to>/` (Iceberg output)
   or the partition `<output>/snapshots=<from>-<to>/` (Parquet output);
4. commits: one Iceberg append carrying the labels and the new watermark together, or the
   commit record created exclusively (`storage.create_exclusive`) for Parquet output.

**Exactly once.** Killed before the commit: the labels table and watermark are unchanged,
the staged range keeps Ray's checkpoint, and the next call resumes that same range (rows it
had labelled are not labelled again), then commits. Killed after the commit: the watermark
has moved, the next call removes the stale staging and labels only what is newer. Two calls
cannot commit one range twice: the lease keeps them apart, and the commit itself re-reads the
watermark (and, for Iceberg, fails on a concurrent commit; the exclusive record for Parquet).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from raycls.job import lease as leases
from raycls import storage
from raycls.job import resume
from raycls.config import JobSpec, OutputSpec
from raycls.errors import InputError, SpecError
from raycls.lake import iceberg

log = logging.getLogger(__name__)

STATE_DIR = "_raycls_lake"
START = "start"


class RewriteError(InputError):
    """A source snapshot since the watermark is not an append, and `on_rewrite` is `error`."""


@dataclass
class Outcome:
    """What one call did: ranges committed, or why it did nothing."""

    source: str
    committed: list[dict[str, Any]] = field(default_factory=list)
    busy: str | None = None
    watermark: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(int(c.get("rows") or 0) for c in self.committed)


def source_name(spec: JobSpec) -> str:
    return spec.input.source if spec.input.format == "iceberg" else f"delta:{storage.absolute(spec.input.path)}"


def _out(spec: JobSpec) -> str:
    return storage.absolute(spec.output.path).rstrip("/")


def _check(spec: JobSpec) -> None:
    if not spec.input.is_table:
        raise SpecError("input.format", "label-new over a table needs input.format iceberg or delta")
    if spec.limit is not None:
        raise SpecError("limit", "an incremental run labels whole snapshots; remove limit (or --limit)")


# --- the watermark: where it is kept ------------------------------------------------------------


def _commit_dir(spec: JobSpec) -> str:
    return storage.join(_out(spec), STATE_DIR, "commits")


def _record_name(start: int | None) -> str:
    return f"after-{START if start is None else start}.json"


def parquet_history(spec: JobSpec) -> list[dict[str, Any]]:
    """The Parquet output's commit records, oldest first, following the chain from the start."""
    names = set(storage.list_names(_commit_dir(spec)))
    chain, start = [], None
    while _record_name(start) in names:
        record = storage.read_json(storage.join(_commit_dir(spec), _record_name(start)))
        if record is None:
            break
        chain.append(record)
        start = record["snapshot"]
    return chain


def committed(spec: JobSpec) -> list[dict[str, Any]]:
    """Every commit of labels of this source in the output, oldest first."""
    if spec.output.format == "iceberg":
        return iceberg.history(iceberg.load_labels(spec.output, spec.input), source_name(spec))
    return parquet_history(spec)


def current_watermark(spec: JobSpec) -> int | None:
    if spec.output.format == "iceberg":
        found = iceberg.watermark(iceberg.load_labels(spec.output, spec.input), source_name(spec))
        return found["snapshot"] if found else None
    chain = parquet_history(spec)
    return chain[-1]["snapshot"] if chain else None


# --- the source: its position and history -----------------------------------------------------


def _target(spec: JobSpec, table) -> int | None:
    if spec.input.format == "iceberg":
        if spec.input.snapshot is not None:
            return spec.input.snapshot
        current = table.current_snapshot()
        return current.snapshot_id if current else None
    from raycls.lake import delta

    return delta.latest_version(spec.input)


def _history(spec: JobSpec, table, start: int | None, target: int) -> list[dict[str, Any]]:
    if spec.input.format == "iceberg":
        return iceberg.snapshots_between(table, start, target)
    from raycls.lake import delta

    return delta.versions_between(spec.input, start, target)


def _planned(spec: JobSpec, table, start: int | None, target: int, history: list[dict[str, Any]], full: bool):
    if spec.input.format == "iceberg":
        return iceberg.plan(spec.input, table, target, start, incremental=not full, history=history)
    from raycls.lake import delta

    return delta.plan_version(spec.input, target) if full else delta.plan_appended(spec.input, history)


# --- one call -----------------------------------------------------------------------------------


@dataclass
class Range:
    start: int | None
    target: int
    history: list[dict[str, Any]]
    full: bool

    @property
    def name(self) -> str:
        return f"{'full' if self.full else (START if self.start is None else self.start)}-{self.target}"


def plan_range(spec: JobSpec, table, start: int | None) -> Range | None:
    """The range the next commit covers, or None when nothing is new. Raises RewriteError
    for a non-append snapshot under `on_rewrite: error`."""
    target = _target(spec, table)
    if target is None or target == start:
        return None
    history = _history(spec, table, start, target)
    rewrites = [h for h in history if not iceberg.is_append(h)]
    policy = spec.incremental.on_rewrite
    if rewrites and policy == "error":
        first = rewrites[0]
        what = ("is no longer in the table's history (expired, or the table was rolled back)" if first["operation"] == "missing"
                else f"is the append half of the rewrite at snapshot {first['part_of']}" if first.get("part_of")
                else f"is a {first['operation']}, not an append")
        raise RewriteError(source_name(spec), f"snapshot {first['snapshot']} {what}; labels of rows it changed would be stale. "
                                              "Set incremental.on_rewrite to skip (label only appended rows) or relabel "
                                              "(label the whole table again and replace the labels)")
    return Range(start, target, history, full=bool(rewrites) and policy == "relabel")


def _stage(spec: JobSpec, rng: Range) -> str:
    if spec.output.format == "iceberg":
        return storage.join(_out(spec), STATE_DIR, "ranges", rng.name)
    return storage.join(_out(spec), f"snapshots={rng.name}")


def _stage_spec(spec: JobSpec, stage: str) -> JobSpec:
    return spec.model_copy(update={"output": OutputSpec(path=stage)})


def _clear_stale_staging(spec: JobSpec, keep: str | None) -> None:
    """Staged ranges of Iceberg output that no longer start at the watermark: committed
    (killed before their cleanup) or planned against a watermark that has since moved."""
    if spec.output.format != "iceberg":
        return
    ranges = storage.join(_out(spec), STATE_DIR, "ranges")
    for name in storage.list_names(ranges):
        path = storage.join(ranges, name)
        if path != keep:
            storage.remove(path, recursive=True)


def _resumable(spec: JobSpec, start: int | None) -> int | None:
    """The target of a range a killed call staged from this watermark (resumed first, so the
    rows it labelled are not paid for again), if any."""
    prefix = f"{START if start is None else start}-"
    if spec.output.format == "iceberg":
        names = storage.list_names(storage.join(_out(spec), STATE_DIR, "ranges"))
    else:
        names = [n[len("snapshots="):] for n in storage.list_names(_out(spec)) if n.startswith("snapshots=")]
    for name in sorted(names):
        if name.startswith(prefix) and name[len(prefix):].lstrip("-").isdigit():
            return int(name[len(prefix):])
    return None


def label_range(spec: JobSpec, table, rng: Range) -> dict[str, Any]:
    """Label one range into its staging output (resuming it) and commit it."""
    from raycls.job.pipeline import run_job
    from raycls.prompting.prompts import build_plan

    stage = _stage(spec, rng)
    _clear_stale_staging(spec, keep=stage)
    sspec = _stage_spec(spec, stage)
    manifest = storage.read_json(storage.join(stage, resume.MANIFEST_FILE))
    planned = _planned(spec, table, rng.start, rng.target, rng.history, rng.full)
    if manifest is not None and manifest.get("finished"):
        rows = int(manifest.get("rows") or 0)  # killed after labelling, before the commit
    elif not planned.files:
        rows = 0
    else:
        rows = int(run_job(sspec, files=planned).metrics.get("rows_written") or 0)
    fields = resume.fingerprint_fields(spec, build_plan(spec))
    record = {"source": source_name(spec), "snapshot": rng.target, "from": rng.start, "rows": rows,
              "mode": "relabel" if rng.full else "append", "fingerprint": resume.fingerprint(fields),
              "per_snapshot": {str(h["snapshot"]): h["added_rows"] for h in rng.history if iceberg.is_append(h)},
              "committed_at": storage.utc_now()}
    if spec.output.format == "iceberg":
        record["labels_snapshot"] = _commit_iceberg(spec, stage, rows, record, planned, rng.full)
        storage.remove(stage, recursive=True)
    else:
        _commit_parquet(spec, stage, record)
    return record


def _staged_rows(spec: JobSpec, stage: str, rows: int, planned) -> pa.Table:
    """The staged labels as one Arrow table (an empty one when the range added no rows)."""
    import pyarrow.dataset as pds

    from raycls import schema
    from raycls.inputs.datasource import pyarrow_filesystem
    from raycls.job.stages import finalize_batch, output_columns

    data = storage.join(stage, resume.DATA_DIR)
    if rows:
        filesystem, _ = pyarrow_filesystem(data)
        fs, path = storage.fs_path(data)
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        return pds.dataset(files, format="parquet", filesystem=filesystem).to_table()
    labels = iceberg.load_labels(spec.output, spec.input)
    if labels is not None:
        return labels.schema().as_arrow().empty_table()
    if not hasattr(planned, "arrow_schema"):
        raise InputError(planned.url, "the range holds no rows and the labels table does not exist yet: nothing to create it from")
    input_schema = planned.arrow_schema()
    types = pa.schema([f.with_name(schema.stored_name(f.name)) for f in input_schema])
    return finalize_batch(pa.table({}), output_columns(spec, input_schema.names), schema.result_schema(spec.label_names), types)


def _commit_iceberg(spec: JobSpec, stage: str, rows: int, record: dict[str, Any], planned, replace: bool) -> int:
    props = {iceberg.PROP_SOURCE: record["source"], iceberg.PROP_SNAPSHOT: str(record["snapshot"]),
             iceberg.PROP_FROM: "" if record["from"] is None else str(record["from"]), iceberg.PROP_ROWS: str(rows),
             iceberg.PROP_MODE: record["mode"], iceberg.PROP_FINGERPRINT: record["fingerprint"],
             iceberg.PROP_PER_SNAPSHOT: json.dumps(record["per_snapshot"])}
    table = _staged_rows(spec, stage, rows, planned)
    _crash_point("before-commit")
    snapshot = iceberg.commit_labels(spec.output, spec.input, table, props, expected=record["from"], replace=replace)
    _crash_point("after-commit")
    return snapshot


def _commit_parquet(spec: JobSpec, stage: str, record: dict[str, Any]) -> None:
    record["partition"] = stage
    _crash_point("before-commit")
    if not storage.create_exclusive(storage.join(_commit_dir(spec), _record_name(record["from"])), record):
        raise iceberg.CommitConflict(_out(spec), f"another run committed the range after {record['from']} meanwhile")
    _crash_point("after-commit")
    if record["mode"] == "relabel":  # the earlier partitions' labels are replaced by this one
        for name in storage.list_names(_out(spec)):
            path = storage.join(_out(spec), name)
            if name.startswith("snapshots=") and path != stage:
                storage.remove(path, recursive=True)


def _crash_point(name: str) -> None:
    """Fault injection for the crash tests: `RAYCLS_LAKE_CRASH=<name>` kills this process here."""
    import os
    import signal

    if os.environ.get("RAYCLS_LAKE_CRASH") == name:
        os.killpg(os.getpgrp(), signal.SIGKILL) if os.getpgrp() == os.getpid() else os.kill(os.getpid(), signal.SIGKILL)


def _open_source(spec: JobSpec):
    if spec.input.format == "iceberg":
        return iceberg.open_table(spec.input)
    return None


def label_new(spec: JobSpec) -> Outcome:
    """One scheduled call over a table (see the module docstring). Safe to overlap."""
    _check(spec)
    outcome = Outcome(source_name(spec))
    try:
        held = leases.acquire(storage.join(_out(spec), STATE_DIR, "lease"))
    except leases.LeaseHeld as exc:
        outcome.busy = str(exc)
        return outcome
    try:
        table = _open_source(spec)
        for _ in range(2):  # a range a killed call staged first, then the rest up to now
            start = current_watermark(spec)
            outcome.watermark = start
            rng = plan_range(spec, table, start)
            if rng is None:
                _clear_stale_staging(spec, keep=None)
                break
            staged = _resumable(spec, start)
            if staged is not None and staged != rng.target and not rng.full:
                rng = Range(start, staged, _history(spec, table, start, staged), full=False)
            record = label_range(spec, table, rng)
            outcome.committed.append(record)
            outcome.watermark = record["snapshot"]
            if rng.target == _target(spec, table):
                break
    finally:
        leases.release(held)
    return outcome


def describe_plan(spec: JobSpec) -> str:
    """`label-new --dry-run`: the watermark and what the next call would label."""
    table = _open_source(spec)
    start = current_watermark(spec)
    rng = plan_range(spec, table, start)
    if rng is None:
        return f"nothing new in {source_name(spec)} (watermark {start})"
    planned = _planned(spec, table, rng.start, rng.target, rng.history, rng.full)
    return (f"{source_name(spec)}: watermark {start}; would label {'the whole table at' if rng.full else 'appends up to'} "
            f"{rng.target}: {len(planned.files)} file(s), snapshots {[h['snapshot'] for h in rng.history]}")


def describe_outcome(outcome: Outcome, output: str) -> str:
    if outcome.busy:
        return f"another label-new run holds {output}; leaving the range to it ({outcome.busy})"
    if not outcome.committed:
        return f"nothing new to label in {outcome.source} (watermark {outcome.watermark})"
    return "\n".join(f"labelled {c['source']} {c['mode']} {START if c['from'] is None else c['from']} -> {c['snapshot']}: "
                     f"{c['rows']} rows -> {output}"
                     + (f" (labels snapshot {c['labels_snapshot']})" if c.get("labels_snapshot") else "")
                     for c in outcome.committed)


def status(spec: JobSpec) -> dict[str, Any]:
    """`raycls status` for a table input: the watermark and each commit's rows per snapshot."""
    commits = committed(spec)
    return {"source": source_name(spec), "output": spec.output.table if spec.output.format == "iceberg" else _out(spec),
            "watermark": commits[-1]["snapshot"] if commits else None,
            "rows_labelled": sum(int(c.get("rows") or 0) for c in commits), "commits": commits}
