"""Resume after any interruption, with every row in the output exactly once.

Finished rows are checkpointed by Ray Data itself (`CheckpointConfig(id_column="id")`),
in `<output>/_checkpoint` or `output.checkpoint_path`. Its write op commits in two
phases, per write task: (1) a *pending* checkpoint `<file>.pending.parquet` naming the
rows, (2) the data file `<output>/data/<file>-N.parquet`, (3) a rename of the pending
checkpoint to `<file>.parquet` (committed). The next run, before reading anything,
deletes every data file whose checkpoint is still pending, then skips the committed ids
at the read. A run killed at any point therefore leaves data files that either have a
committed checkpoint (kept, never relabelled) or a pending one (deleted, relabelled).

What this module adds around it, because Ray alone does not give exactly-once here:

- **A run manifest** `<output>/_raycls_run.json`: the spec fingerprint (backend, model,
  prompt id, labels, input) and a `finished` flag. Ray deletes its checkpoint when a run
  succeeds, so without the flag the same command again would label everything a second
  time into the same folder. We keep Ray's checkpoint until the manifest says
  `finished`, then delete it ourselves.
- **Refusals** (`ResumeError`): a finished output is not redone without `--overwrite`; an
  unfinished one is not continued by a job whose fingerprint differs (the labels would
  mix); data without a manifest or without its checkpoint is not guessed at.
- **Reconciliation before Ray plans the run**: on object stores a rename is copy + delete,
  so a kill can leave a checkpoint both committed and pending; Ray would then delete the
  finished data but keep its ids, losing rows. We drop such pending files first, and
  delete data files that match no checkpoint at all.
- **A lease** (`raycls.job.lease`): one run at a time per output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raycls.job import lease as leases
from raycls import schema, storage
from raycls.errors import LeaseLost, ResumeError

if TYPE_CHECKING:
    from ray.data.checkpoint import CheckpointConfig

    from raycls.config import JobSpec
    from raycls.prompting.prompts import PromptPlan

log = logging.getLogger(__name__)

MANIFEST_FILE = "_raycls_run.json"
LEASE_DIR = "_raycls_lease"
DATA_DIR = "data"
METRICS_FILE = "metrics.json"
MANIFEST_FORMAT = 1
_PENDING = ".pending.parquet"
_MAX_ATTEMPTS_KEPT = 20


def fingerprint_fields(spec: "JobSpec", plan: "PromptPlan") -> dict[str, Any]:
    """What decides a row's label and the output's shape: runs that differ here must not mix.

    The backend says which of its settings can change a label (`Backend.fingerprint`)."""
    from raycls.backends import create_backend

    return {
        "backend": spec.backend.kind,
        "model": spec.backend.model,
        **{f"backend.{key}": value for key, value in create_backend(spec, plan).fingerprint().items()},
        "prompt_id": plan.prompt_id,
        "labels": spec.label_names,
        "input.path": storage.absolute(spec.input.path) if spec.input.path else spec.input.source,
        "input.text": spec.input.text,
        "input.id_column": spec.input.id_column,
        "input.gold_column": spec.input.gold_column,
        "input.keep_columns": spec.input.keep_columns,
        # Calibration changes labels; absent when off, so earlier outputs still match.
        **({"calibration": spec.calibration.model_dump()} if spec.calibration.method != "none" else {}),
    }


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]



@dataclass
class Run:
    """One attempt at a job's output: holds its lease until `finish` or `close`."""

    output: str
    checkpoint: str
    manifest: dict[str, Any]
    lease: leases.Lease
    resumed_rows: int = 0
    """Rows finished by earlier attempts (committed in the checkpoint when this one began)."""
    _closed: bool = field(default=False, repr=False)

    @property
    def data(self) -> str:
        return storage.join(self.output, DATA_DIR)

    def checkpoint_config(self) -> "CheckpointConfig":
        """Ray Data's checkpointing for this run; Ray must not delete it on success (we do)."""
        from ray.data.checkpoint import CheckpointConfig

        from raycls.inputs.datasource import pyarrow_filesystem

        filesystem, _ = pyarrow_filesystem(self.checkpoint)
        return CheckpointConfig(
            id_column=schema.ID,
            checkpoint_path=self.checkpoint,
            delete_checkpoint_on_success=False,
            override_filesystem=filesystem,
        )

    def finish(self, metrics: dict[str, Any] | None = None) -> None:
        """Mark the output finished, then drop the checkpoint (in that order: a kill
        in between leaves a finished output with a stale checkpoint, never the reverse)."""
        if self.lease.lost:  # not marking the output finished: it is the other run's now
            raise LeaseLost(self.lease.url)
        self.manifest["finished"] = True
        self.manifest["finished_at"] = storage.utc_now()
        if metrics is not None:
            self.manifest["rows"] = metrics.get("rows_written")
        storage.write_json(storage.join(self.output, MANIFEST_FILE), self.manifest)
        storage.remove(self.checkpoint, recursive=True)
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            leases.release(self.lease)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def status(spec: "JobSpec") -> dict[str, Any]:
    """What the spec's output holds, for `raycls status`: its run manifest, and how many
    rows an unfinished run has committed so far."""
    out = storage.absolute(spec.output.path).rstrip("/")
    manifest = storage.read_json(storage.join(out, MANIFEST_FILE))
    if manifest is None:
        return {"output": out, "state": "empty"}
    state = "finished" if manifest.get("finished") else "unfinished"
    found: dict[str, Any] = {"output": out, "state": state, "manifest": manifest}
    if state == "unfinished":
        found["rows_committed"] = committed_rows(storage.absolute(spec.checkpoint_path).rstrip("/"))
    metrics = storage.read_json(storage.join(out, METRICS_FILE))
    if metrics is not None:
        found["metrics"] = {k: metrics.get(k) for k in ("rows_read", "rows_written", "rows_failed", "accuracy", "macro_f1")}
    return found


def preflight(spec: "JobSpec", plan: "PromptPlan", overwrite: bool = False) -> None:
    """Refuse early, before Ray starts or a model loads: one read of the run manifest.

    `begin` checks again under the lease; this only saves the user a slow start."""
    if overwrite:
        return
    out = storage.absolute(spec.output.path).rstrip("/")
    manifest = storage.read_json(storage.join(out, MANIFEST_FILE))
    if manifest is not None:
        _check_resumable(out, storage.absolute(spec.checkpoint_path), manifest, fingerprint_fields(spec, plan))


def begin(spec: "JobSpec", plan: "PromptPlan", overwrite: bool = False) -> Run:
    """Take the output's lease, check it may be (re)used, reconcile its checkpoint."""
    out = storage.absolute(spec.output.path).rstrip("/")
    checkpoint = storage.absolute(spec.checkpoint_path).rstrip("/")
    lease = leases.acquire(storage.join(out, LEASE_DIR))
    try:
        fields = fingerprint_fields(spec, plan)
        manifest_url = storage.join(out, MANIFEST_FILE)
        manifest = storage.read_json(manifest_url)
        if overwrite:
            clear(out, checkpoint)
            manifest = None
        elif manifest is not None:
            _check_resumable(out, checkpoint, manifest, fields)
        elif _data_files(storage.join(out, DATA_DIR)):
            raise ResumeError(
                f"{out}/{DATA_DIR} holds Parquet files but no run manifest ({MANIFEST_FILE}): it was not written "
                f"by this version of raycls; pick another output path, or pass --overwrite to replace it"
            )
        if manifest is not None:
            reconcile(checkpoint, storage.join(out, DATA_DIR))
        resumed = committed_rows(checkpoint)
        manifest = manifest or {"format": MANIFEST_FORMAT, "created_at": storage.utc_now(), "attempts": []}
        manifest.update({"fingerprint": fingerprint(fields), "spec": fields, "finished": False, "checkpoint": checkpoint})
        manifest["attempts"] = (manifest.get("attempts", []) + [{"started_at": storage.utc_now(), "resumed_rows": resumed}])[-_MAX_ATTEMPTS_KEPT:]
        manifest["attempt_count"] = manifest.get("attempt_count", 0) + 1
        storage.write_json(manifest_url, manifest)
        if resumed:
            log.info("resuming %s: %d rows already finished, labelling the rest", out, resumed)
        return Run(out, checkpoint, manifest, lease, resumed)
    except BaseException:
        leases.release(lease)
        raise


def _has_rows(out: str, checkpoint: str) -> bool:
    return bool(storage.list_names(checkpoint)) or bool(_data_files(storage.join(out, DATA_DIR)))


def _check_resumable(out: str, checkpoint: str, manifest: dict[str, Any], fields: dict[str, Any]) -> None:
    """Refuse a finished output, and an unfinished one of a different job that has rows
    (one that stopped before writing anything holds nothing to mix with)."""
    old = manifest.get("spec", {})
    changed = [f"{key}: was {old.get(key)!r}, now {value!r}" for key, value in fields.items() if old.get(key) != value]
    if changed and (manifest.get("finished") or _has_rows(out, checkpoint)):
        state = "a finished" if manifest.get("finished") else "an unfinished"
        raise ResumeError(
            f"{out} holds {state} run of a different job ({'; '.join(changed)}); continuing it would mix "
            f"labels from both. Use another output path, or pass --overwrite to discard it"
        )
    if manifest.get("finished"):
        raise ResumeError(
            f"{out} already holds a finished run ({manifest.get('rows')} rows, finished {manifest.get('finished_at')}); "
            f"pass --overwrite to label it again"
        )


def clear(out: str, checkpoint: str) -> None:
    """Remove what raycls wrote in an output: data, checkpoint, metrics, manifest."""
    for url in (storage.join(out, DATA_DIR), checkpoint):
        storage.remove(url, recursive=True)
    for name in (METRICS_FILE, MANIFEST_FILE):
        storage.remove(storage.join(out, name))


def _data_files(data_url: str) -> list[str]:
    fs, path = storage.fs_path(data_url)
    fs.invalidate_cache(path)
    try:
        return [f for f in fs.find(path) if f.endswith(".parquet")]
    except FileNotFoundError:
        return []


def _task_prefix(name: str) -> str:
    """`<dataset>_<write>_<task>` of a Ray data file `<dataset>_<write>_<task>-<n>.parquet`."""
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def reconcile(checkpoint: str, data_url: str) -> None:
    """Bring checkpoint and data into the state Ray's recovery expects (see module doc)."""
    names = storage.list_names(checkpoint)
    data = _data_files(data_url)
    if not names:
        if data:
            raise ResumeError(
                f"{data_url} holds {len(data)} data file(s) but the checkpoint {checkpoint} is gone, so the "
                f"finished rows cannot be told apart; pass --overwrite to start again"
            )
        return
    committed = {n[: -len(".parquet")] for n in names if n.endswith(".parquet") and not n.endswith(_PENDING)}
    pending = {n[: -len(_PENDING)] for n in names if n.endswith(_PENDING)}
    for prefix in sorted(committed & pending):
        # The rename pending -> committed was a copy + delete cut short: the data is whole.
        log.warning("checkpoint %s is both committed and pending; keeping the committed one", prefix)
        storage.remove(storage.join(checkpoint, prefix + _PENDING))
    fs, _ = storage.fs_path(data_url)
    for path in data:
        if _task_prefix(posixpath.basename(path)) not in committed | pending:
            log.warning("removing %s: it matches no checkpoint, its rows will be labelled again", path)
            fs.rm_file(path)


def committed_rows(checkpoint: str) -> int:
    """Rows in committed checkpoint files (from Parquet footers, not the data)."""
    import pyarrow.dataset as pds

    from raycls.inputs.datasource import pyarrow_filesystem

    files = [n for n in storage.list_names(checkpoint) if n.endswith(".parquet") and not n.endswith(_PENDING)]
    if not files:
        return 0
    filesystem, path = pyarrow_filesystem(checkpoint)
    paths = [posixpath.join(path, n) for n in files]
    return int(pds.dataset(paths, format="parquet", filesystem=filesystem).count_rows())
