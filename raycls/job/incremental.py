"""Incremental labelling of a data lake: label only the files that landed since the last run.

A scheduler (cron, an hourly `ray job submit`) points the same spec at an input prefix that
keeps receiving files (`dt=2026-11-22/part-0.parquet`, ...). Each call labels the files no
earlier call took, as a new partition of the output, a normal raycls output of its own:

    <output.path>/batch=<UTC time>-<suffix>/data/*.parquet, metrics.json, _raycls_run.json
    <output.path>/_raycls_incremental/claims/<sha of file path>.json   one per input file
    <output.path>/_raycls_incremental/batches/<batch>.json             one per finished batch (the manifest)
    <output.path>/_raycls_incremental/running/<batch>.json             one per batch not finished yet

Exactly once, with overlapping and crashing runs:

- **Claims.** A file belongs to the batch that created its claim record first, through
  `storage.create_exclusive` (`os.link` locally, a conditional PUT on S3): of two runs
  racing for a file exactly one wins, so no file is labelled twice. Claims are never
  removed: a file that has one is never claimed again.
- **Leases, not timeouts, for dead runs.** A batch is worked on under the raycls lease of
  its partition (`raycls.job.lease`, the same lease `run_job` takes on an output): renewed by a
  heartbeat, free when its holder released it, did not renew for `ttl_s`, or died on this
  host. A fixed claim timeout would have to outlast the longest batch (hours) to be safe,
  and then a crashed batch would wait that long; a heartbeat frees it at once locally and
  after `RAYCLS_LEASE_TTL_S` (60 s) from another host, and never frees a live one.
- **Resume.** Every call first looks for batches not marked finished whose lease is free,
  takes the lease and finishes them (`run_job` resumes from the partition's checkpoint),
  then claims new files. A run that died while claiming left a batch record listing the
  files it meant to take; the files it did claim are found through their claim records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from raycls.job import lease as leases
from raycls import storage
from raycls.job import resume
from raycls.config import JobSpec, OutputSpec
from raycls.errors import InputError, SpecError
from raycls.inputs.datasource import InputFiles, resolve_input

log = logging.getLogger(__name__)

STATE_DIR = "_raycls_incremental"
CLAIMS_DIR = "claims"
BATCHES_DIR = "batches"
RUNNING_DIR = "running"
BATCH_PREFIX = "batch="
CLAIMING, LABELLING, FINISHED = "claiming", "labelling", "finished"
"""Batch states: files being claimed, being labelled, done (rows in the partition)."""



@dataclass(frozen=True)
class Layout:
    """Where an incremental output keeps its partitions, claims and batch records."""

    output: str

    @classmethod
    def of(cls, spec: JobSpec) -> "Layout":
        return cls(storage.absolute(spec.output.path).rstrip("/"))

    @property
    def claims(self) -> str:
        return storage.join(self.output, STATE_DIR, CLAIMS_DIR)

    @property
    def batches(self) -> str:
        """Records of finished batches: kept apart so a call lists only the few unfinished ones."""
        return storage.join(self.output, STATE_DIR, BATCHES_DIR)

    @property
    def running(self) -> str:
        """Records of batches being claimed or labelled (or left so by a run that died)."""
        return storage.join(self.output, STATE_DIR, RUNNING_DIR)

    def claim(self, relpath: str) -> str:
        return storage.join(self.claims, claim_name(relpath))

    def batch_record(self, batch: str) -> str:
        return storage.join(self.batches, f"{batch}.json")

    def running_record(self, batch: str) -> str:
        return storage.join(self.running, f"{batch}.json")

    def partition(self, batch: str) -> str:
        return storage.join(self.output, f"{BATCH_PREFIX}{batch}")

    def lease(self, batch: str) -> str:
        """The partition's own output lease: `run_job` takes the same one (re-entrant)."""
        return storage.join(self.partition(batch), resume.LEASE_DIR)


def claim_name(relpath: str) -> str:
    """A file's claim record name: a hash, as paths may be long or hold `/` and `=`."""
    return hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:32] + ".json"


def new_batch_id() -> str:
    """UTC time first, so partitions sort by when they were started; a suffix keeps
    two runs started in the same second apart."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass
class Plan:
    """What a call would do: files nobody claimed yet, and unfinished batches."""

    input: InputFiles | None
    new_files: list[str]
    """Paths relative to the input root, in listing order."""
    unfinished: list[dict[str, Any]] = field(default_factory=list)
    """Batch records not marked finished (their runs may be alive or dead)."""


@dataclass
class Outcome:
    """What one call did."""

    labelled: list[dict[str, Any]] = field(default_factory=list)
    """Batch records finished by this call (resumed ones included)."""
    busy: list[str] = field(default_factory=list)
    """Unfinished batches left alone because a live run holds them."""

    @property
    def rows(self) -> int:
        return sum(int(b.get("rows") or 0) for b in self.labelled)


def _check_spec(spec: JobSpec) -> None:
    if spec.input.is_table:
        raise SpecError("input.format", "a table input's new rows come from its snapshots: use raycls.lake.runs.label_new")
    if spec.limit is not None:
        raise SpecError("limit", "an incremental run labels whole files; remove limit (or --limit)")


def list_input(spec: JobSpec) -> InputFiles | None:
    """The input's files as they are now (fresh listing), or None when there are none yet."""
    fs, path = storage.fs_path(spec.input.path)
    fs.invalidate_cache()  # a long-lived process must see files that landed since
    try:
        return resolve_input(spec.input)
    except InputError:
        if fs.exists(path) and not any(not posixpath.basename(f).startswith(("_", ".")) for f in _find(fs, path)):
            return None  # the prefix exists but holds no data yet: nothing to do, not an error
        raise


def _find(fs: Any, path: str) -> list[str]:
    try:
        return list(fs.find(path))
    except FileNotFoundError:
        return []


def relpath(files: InputFiles, path: str) -> str:
    """A file's path relative to the input root: its identity in claims and row ids."""
    return posixpath.relpath(path, files.root) if files.root else path


def _records(directory: str) -> list[dict[str, Any]]:
    records = []
    for name in storage.list_names(directory):
        if name.endswith(".json"):
            record = storage.read_json(storage.join(directory, name))
            if record is not None:
                records.append(record)
    return records


def unfinished_records(layout: Layout) -> list[dict[str, Any]]:
    """Records of batches not finished (a finished one whose running record a crash left
    behind is not counted)."""
    finished = {n[: -len(".json")] for n in storage.list_names(layout.batches)}
    return [r for r in _records(layout.running) if r.get("batch") not in finished]


def batch_records(layout: Layout) -> list[dict[str, Any]]:
    """Every batch record, finished or not, oldest first: the incremental manifest."""
    finished = _records(layout.batches)
    done = {r.get("batch") for r in finished}
    running = [r for r in _records(layout.running) if r.get("batch") not in done]
    return sorted(finished + running, key=lambda r: r.get("batch", ""))


def plan(spec: JobSpec) -> Plan:
    """List what a call would label, without claiming anything (cheap: listings only)."""
    _check_spec(spec)
    layout = Layout.of(spec)
    files = list_input(spec)
    unfinished = unfinished_records(layout)
    if files is None:
        return Plan(None, [], unfinished)
    claimed = set(storage.list_names(layout.claims))
    new = [relpath(files, f) for f in files.files]
    return Plan(files, [r for r in new if claim_name(r) not in claimed], unfinished)


def _file_meta(files: InputFiles, rel: str) -> dict[str, Any]:
    """Size, ETag and modification time of an input file, as the filesystem reports them."""
    try:
        info = files.fs.info(posixpath.join(files.root, rel) if files.root else rel)
    except (FileNotFoundError, OSError):
        return {"path": rel}
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if isinstance(mtime, (int, float)):  # local files: seconds since the epoch
        mtime = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    elif hasattr(mtime, "isoformat"):  # object stores: a datetime
        mtime = mtime.isoformat()
    etag = info.get("ETag") or info.get("etag")
    return {"path": rel, "size": info.get("size"), "etag": str(etag).strip('"') if etag else None,
            "mtime": str(mtime) if mtime is not None else None}


def _who() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _batch_spec(spec: JobSpec, layout: Layout, batch: str) -> JobSpec:
    """The spec of one partition: same job, output (and checkpoint) inside the partition."""
    checkpoint = spec.output.checkpoint_path
    if checkpoint:
        checkpoint = storage.join(checkpoint, f"{BATCH_PREFIX}{batch}")
    return spec.model_copy(update={"output": OutputSpec(path=layout.partition(batch), checkpoint_path=checkpoint)})


def claim_files(layout: Layout, files: InputFiles, wanted: list[str], batch: str,
                limit: int | None = None) -> list[dict[str, Any]]:
    """Claim wanted files for `batch`, in order, until `limit` are won; returns the metadata
    of those this call won. A file lost to an overlapping call is skipped, not waited for."""
    won: list[dict[str, Any]] = []
    for rel in wanted:
        if limit is not None and len(won) >= limit:
            break
        meta = _file_meta(files, rel)
        record = {**meta, "batch": batch, "claimed_at": storage.utc_now(), **_who()}
        if storage.create_exclusive(layout.claim(rel), record):
            won.append(meta)
    return won


def _claimed_by(layout: Layout, batch: str, rels: list[str]) -> list[dict[str, Any]]:
    """Of the files a batch meant to claim, those whose claim names this batch."""
    owned = []
    for rel in rels:
        claim = storage.read_json(layout.claim(rel))
        if claim is not None and claim.get("batch") == batch:
            owned.append({k: claim.get(k) for k in ("path", "size", "etag", "mtime")})
    return owned


def _drop_batch(layout: Layout, batch: str) -> None:
    """Forget a batch that owns no file (it lost every claim, or died before its first).
    Its partition (only a lease by now) goes once the lease is released."""
    storage.remove(layout.running_record(batch))


def _release(layout: Layout, batch: str, held: leases.Lease) -> None:
    """Release a batch's lease; remove the partition too when the batch was dropped."""
    leases.release(held)
    if held.holders == 0 and not storage.exists(layout.running_record(batch)) and not storage.exists(layout.batch_record(batch)):
        storage.remove(layout.partition(batch), recursive=True)


def label_batch(spec: JobSpec, layout: Layout, files: InputFiles, record: dict[str, Any]) -> dict[str, Any]:
    """Label a claimed batch into its partition (resuming it if an earlier run started it)
    and mark its record finished. The caller holds the batch's lease."""
    from raycls.job.pipeline import run_job

    batch = record["batch"]
    rels = [f["path"] for f in record["files"]]
    missing = [r for r in rels if not files.fs.exists(posixpath.join(files.root, r) if files.root else r)]
    if missing:
        raise InputError(files.url, f"batch {batch} claimed {len(missing)} file(s) that are gone, e.g. {missing[0]}; "
                                    f"restore them, or remove {layout.running_record(batch)} and their claims")
    subset = dataclasses.replace(files, files=tuple(posixpath.join(files.root, r) if files.root else r for r in rels))
    bspec = _batch_spec(spec, layout, batch)
    done = storage.read_json(storage.join(layout.partition(batch), resume.MANIFEST_FILE))
    if done is not None and done.get("finished"):  # died after the partition finished, before the record
        rows = done.get("rows")
    else:
        rows = run_job(bspec, files=subset).metrics.get("rows_written")
    record.update({"state": FINISHED, "rows": rows, "finished_at": storage.utc_now(), **_who()})
    storage.write_json(layout.batch_record(batch), record)  # first: a kill in between leaves both, read as finished
    storage.remove(layout.running_record(batch))
    return record


def _take(layout: Layout, batch: str) -> leases.Lease | None:
    """The batch's lease, or None when a live run holds it."""
    try:
        return leases.acquire(layout.lease(batch))
    except leases.LeaseHeld:
        return None


def resume_unfinished(spec: JobSpec, layout: Layout, files: InputFiles | None, outcome: Outcome) -> None:
    """Finish every batch whose run died (its lease is free); leave live ones alone."""
    for stale in unfinished_records(layout):
        batch = stale["batch"]
        held = _take(layout, batch)
        if held is None:
            log.info("batch %s is being labelled by a live run; leaving it", batch)
            outcome.busy.append(batch)
            continue
        try:
            with leases.lost_as_error(held):  # a lease lost to another run: LeaseLost, not Ctrl-C
                record = storage.read_json(layout.running_record(batch))  # again, now that we hold it
                if record is None or storage.exists(layout.batch_record(batch)):
                    storage.remove(layout.running_record(batch))  # finished meanwhile, or killed right after
                    continue
                if record.get("state") == CLAIMING:  # died mid-claim: keep what it did claim
                    record["files"] = _claimed_by(layout, batch, record.get("wanted", []))
                    record["state"] = LABELLING
                    if not record["files"]:
                        _drop_batch(layout, batch)
                        continue
                    storage.write_json(layout.running_record(batch), record)
                if files is None:
                    raise InputError(spec.input.path, f"batch {batch} claimed files but the input lists none now")
                record["resumed"] = int(record.get("resumed", 0)) + 1
                log.info("resuming batch %s (%d file(s)) left unfinished by an earlier run", batch, len(record["files"]))
                outcome.labelled.append(label_batch(spec, layout, files, record))
        finally:
            _release(layout, batch, held)


def label_new(spec: JobSpec, max_files: int | None = None) -> Outcome:
    """One scheduled call: finish dead runs' batches, then label the files nobody claimed
    (at most `max_files` of them) as a new partition. Safe to overlap with other calls."""
    _check_spec(spec)
    layout = Layout.of(spec)
    files = list_input(spec)
    outcome = Outcome()
    resume_unfinished(spec, layout, files, outcome)
    if files is None:
        return outcome
    claimed = set(storage.list_names(layout.claims))
    wanted = [r for r in (relpath(files, f) for f in files.files) if claim_name(r) not in claimed]
    if not wanted:
        return outcome
    batch = new_batch_id()
    held = leases.acquire(layout.lease(batch))
    try:
        with leases.lost_as_error(held):  # a lease lost to another run: LeaseLost, not Ctrl-C
            record = {"batch": batch, "state": CLAIMING, "created_at": storage.utc_now(), "input": storage.absolute(spec.input.path),
                      "partition": layout.partition(batch), "wanted": wanted, "files": [], **_who()}
            storage.write_json(layout.running_record(batch), record)  # before any claim: a crash leaves a trace
            record["files"] = claim_files(layout, files, wanted, batch, limit=max_files)
            if not record["files"]:  # an overlapping run took them all
                _drop_batch(layout, batch)
                return outcome
            record["state"] = LABELLING
            del record["wanted"]
            storage.write_json(layout.running_record(batch), record)
            log.info("batch %s: labelling %d new file(s)", batch, len(record["files"]))
            outcome.labelled.append(label_batch(spec, layout, files, record))
    finally:
        _release(layout, batch, held)
    return outcome


def describe_plan(p: Plan) -> str:
    """The `--dry-run` listing: new files and unfinished batches."""
    lines = [f"{len(p.new_files)} new file(s) would be labelled" + (":" if p.new_files else "")]
    lines += [f"  {rel}" for rel in p.new_files]
    for r in p.unfinished:
        lines.append(f"unfinished batch {r.get('batch')} ({r.get('state')}, {len(r.get('files') or r.get('wanted') or [])} "
                     f"file(s)): resumed by the next run once no live run holds it")
    return "\n".join(lines)


def describe_outcome(o: Outcome, output: str) -> str:
    """The line(s) a scheduled call prints: what it labelled, or that there was nothing new."""
    if not o.labelled:
        busy = f" ({len(o.busy)} batch(es) still running elsewhere)" if o.busy else ""
        return f"nothing new to label in {output}{busy}"
    return "\n".join(f"labelled batch {b['batch']}: {len(b['files'])} file(s), {b.get('rows')} rows -> {b['partition']}"
                     for b in o.labelled)
