"""The response cache: a row whose (model, prompt, sampling settings, text) was labelled
before is not sent to a model again: not within a run (duplicate texts), not across runs
(a re-crawl of old documents, a re-run into a new output). Its output row says `cached`.

Design, on Ray, for any backend (`CachedBackend` wraps the one the spec names):

- **Key.** `sha256(namespace, text)`, where the namespace hashes the backend's
  `fingerprint()` (model, sampling, response format, endpoint...) and the prompt id (the
  rendered template and label set), and `ENTRY_FORMAT`. Entries live under
  `<cache.path>/<namespace>/`, so a changed prompt, model, temperature or entry format
  simply starts an empty namespace.
- **Store.** Parquet files of (key, result as JSON) on any fsspec filesystem, in 64 buckets
  by key (`b07/<uuid>.parquet`). Files are only ever added (by many runs at once, safely);
  an entry stored twice is the same answer.
- **Cache actors.** `cache.actors` plain Ray actors (no CPU reserved) on the driver's node
  (`raycls.backends.placement`: a lost worker node must not take the parked rows with it),
  each owning the buckets `b % actors`. An actor loads its buckets when first asked, keeps them in a dict,
  and appends the run's new answers to its buckets when the run closes (and every 20,000
  new answers, so a crash loses little). One call per batch and actor, so the cost per row
  is a hash and a dict lookup.
- **Two map steps around the backend** keep the plan read → maps → write that Ray Data's
  checkpointing needs. `lookup` asks the actors about each row's key: a *hit* passes the
  backend with `error = cache_hit` (the contract lets such rows skip the model) and its
  answer in a working column; the first row with a new key becomes its *leader* and goes to
  the model; a row whose key has a leader in flight (in this batch or another) is *parked*
  at the actor (its Arrow row) and leaves the batch. `restore`, after the backend, fills in
  hits, publishes each leader's answer (stored when it is a label, dropped when it is an
  error) and takes back the rows parked on it, which get the leader's answer and re-enter
  the stream there. Nothing ever waits for another row, so no batch can block another.
- **Exactly once.** Every row leaves `restore` exactly once (hits and leaders in their own
  batch, parked rows in their leader's), so rows out = rows in at the write, and Ray's
  checkpoint records each id once. A run that dies loses the actors' in-flight state with
  the rows not yet written; the resumed run reads those rows again and asks afresh.
- **In the backend's own terms.** The wrapper stores and restores rows exactly as the
  inner backend wrote them (`Backend.result_types`: `label_probs` keyed by the answer
  words a model was scored on, not the label names); names and calibration are applied
  once, after it (`raycls.quality.calibration`). So a run with the cache on writes what the same
  run with it off writes, but for `cached`, the tokens of hits and the calls made.
- **A failed answer, decided once per run.** When a leader fails (`api_error`,
  `unparseable_output`), every row of its text in this run carries the same error, whether
  it was parked before the failure or arrives after it: the actor remembers the failure
  for the rest of the run. So a run makes exactly one call (and its retries) per distinct
  text, whatever the scheduling. Failures are never stored, so a later run asks again. A
  leader the backend leaves out (the API backend when no key is left) leaves its parked
  rows out too, for the next run, as the backend does with its own.

Cost at 100M rows (of which U unique texts): the store holds U entries of ~100-200 bytes of
Parquet (10-20 GB at U = 100M), read once per run by the actors; in memory an entry costs
about 300-400 bytes of Python objects (a 32-character key and the answer's JSON), so
U = 100M needs ~35 GB across the cache actors, all on the driver's node: the cache is meant
for lakes whose distinct texts fit in the head node's memory; beyond that, a key-
value service would replace the actors behind the same two steps. Per row at run time: a
SHA-256 of the text and a share of two actor calls per batch (microseconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raycls import schema, storage
from raycls.backends.placement import on_driver_node

if TYPE_CHECKING:
    from ray.data import Dataset

    from raycls.backends import Backend
    from raycls.config import JobSpec
    from raycls.prompting.prompts import PromptPlan
    from raycls.prompting.tokens import TokenBudget

log = logging.getLogger(__name__)

BUCKETS = 64
"""Store buckets by key; fixed, so runs with different `cache.actors` share a store."""
FLUSH_EVERY = 20_000
"""New answers an actor holds before it writes them out."""
ENV_PATH = "RAYCLS_RESPONSE_CACHE"
"""Default store location when the spec names none; `off` turns the default cache off."""
_STORED = (schema.LABEL, schema.CONFIDENCE, schema.LABEL_PROBS, schema.REASONING, schema.RAW_OUTPUT,
           schema.TRUNCATED, schema.MULTI_LABEL, schema.MODEL, schema.PROMPT_ID)
"""The result columns an entry keeps; a reused answer costs no tokens and has no error."""
_HIT, _LEAD, _PARK = "hit", "lead", "park"
ENTRY_FORMAT = 3
"""Part of every namespace: bump it when a stored answer's meaning changes (how label
probabilities are scored, which columns an entry keeps), so old entries are not reused.
3: entries keep `label_probs` in the backend's own terms (format 2 dropped the probability
of a label with an `answer`)."""


def store_url(spec: "JobSpec") -> str | None:
    """Where the job's cache lives, or None when the cache is off."""
    if not spec.cache.enabled:
        return None
    if spec.cache.path:
        return spec.cache.path
    env = os.environ.get(ENV_PATH)
    if env:
        return None if env.lower() == "off" else env
    return str(Path(os.environ.get("RAYCLS_CACHE", Path.home() / ".cache" / "raycls")) / "responses")


def namespace(fingerprint: dict[str, Any], prompt_id: str) -> str:
    """What makes two answers to one text interchangeable: the backend settings, the prompt and the entry format."""
    material = json.dumps({"backend": fingerprint, "prompt_id": prompt_id, "format": ENTRY_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def row_key(ns: str, text: str) -> str:
    return hashlib.sha256(f"{ns}\0{text}".encode()).hexdigest()[:32]


def bucket(key: str) -> int:
    return int(key[:4], 16) % BUCKETS


def wrap(backend: "Backend", spec: "JobSpec", plan: "PromptPlan") -> "Backend":
    """The backend itself when the cache is off, else the backend behind the cache."""
    url = store_url(spec)
    return backend if url is None else CachedBackend(backend, spec, plan, url)


class CachedBackend:
    """Any backend behind the response cache; the same contract (`raycls.backends`)."""

    def __init__(self, inner: "Backend", spec: "JobSpec", plan: "PromptPlan", url: str):
        self.inner, self.spec, self.plan = inner, spec, plan
        self.url = storage.absolute(url)
        self.actors: list[Any] = []

    def prepare(self) -> None:
        import ray

        self.inner.prepare()
        ns = namespace(self.inner.fingerprint(), self.plan.prompt_id)
        root = storage.join(self.url, ns)
        n = self.spec.cache.actors
        shard = ray.remote(num_cpus=0, max_restarts=0)(CacheShard).options(scheduling_strategy=on_driver_node())
        self.actors = [shard.remote(root, i, n) for i in range(n)]
        self.ns = ns

    def label(self, ds: "Dataset") -> "Dataset":
        if not self.actors:
            self.prepare()
        # Batches of the backend's size: a duplicate parks on a leader that is at most one batch ahead of it.
        ds = ds.map_batches(lookup_batch, fn_kwargs={"actors": self.actors, "ns": self.ns}, batch_format="pyarrow",
                            batch_size=self.spec.backend.batch_size)
        ds = self.inner.label(ds)
        types = self.inner.result_types()
        return ds.map_batches(restore_batch, fn_kwargs={"actors": self.actors, "result_types": types}, batch_format="pyarrow")

    def result_types(self) -> pa.Schema:
        return self.inner.result_types()

    def token_budget(self) -> "TokenBudget":
        return self.inner.token_budget()

    def fingerprint(self) -> dict[str, Any]:
        return self.inner.fingerprint()  # the cache never changes a label

    def estimate(self, calls: int, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        return self.inner.estimate(calls, input_tokens, output_tokens)  # an upper bound: hits cost nothing

    def stopped_early(self) -> str | None:
        return self.inner.stopped_early()

    def report(self, metrics: dict[str, Any]) -> dict[str, Any]:
        import ray

        counts: Counter = Counter()
        for stats in ray.get([a.stats.remote() for a in self.actors], timeout=60):
            counts.update(stats)
        out = self.inner.report(metrics)
        return {**out, "cache": {"path": self.url, "namespace": self.ns, **dict(counts)}}

    def close(self) -> None:
        """Store the run's new answers, then stop the cache actors and the backend.

        A cache actor that is gone takes only its new answers with it: they save calls, they
        are not output. So its loss is logged, not raised (it would hide the error that ended
        the run), and the next run asks the model for those texts again.
        """
        import ray

        try:
            flushes = [a.flush.remote() for a in self.actors]
            for i, ref in enumerate(flushes):
                try:
                    ray.get(ref, timeout=300)
                except ray.exceptions.RayActorError as exc:
                    log.warning("response cache actor %d of %d is gone (%s): its new answers were not stored, "
                                "a later run asks the model for them again", i + 1, len(flushes), type(exc).__name__)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            self.inner.close()


# -- the two map steps ---------------------------------------------------------------------


def _by_actor(actors: list[Any], keys: list[str]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for key in keys:
        groups[bucket(key) % len(actors)].append(key)
    return groups


def _ask(actors: list[Any], method: str, items: dict[str, Any]) -> dict[str, Any]:
    """Call `method` on every actor with its share of `items` (key -> value); merge the answers."""
    import ray

    calls = [getattr(actors[i], method).remote({k: items[k] for k in keys})
             for i, keys in _by_actor(actors, list(items)).items()]
    merged: dict[str, Any] = {}
    for answer in ray.get(calls):
        merged.update(answer)
    return merged


def lookup_batch(batch: pa.Table, actors: list[Any], ns: str) -> pa.Table:
    """Mark hits (they skip the model), keep leaders, park rows whose key has a leader in flight."""
    texts = batch.column(schema.TEXT).to_pylist()
    errors = batch.column(schema.ERROR).to_pylist()
    keys = [row_key(ns, t) if t is not None and e is None else None for t, e in zip(texts, errors)]
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if key is not None:
            rows_of[key].append(i)
    verdicts = _ask(actors, "admit", {k: None for k in rows_of})
    hits: dict[int, str] = {}
    leaders: set[int] = set()
    parked: dict[str, list[int]] = {}
    for key, rows in rows_of.items():
        verdict, value = verdicts[key]
        if verdict == _HIT:
            hits.update((i, value) for i in rows)
        elif verdict == _LEAD:
            leaders.add(rows[0])
            if rows[1:]:
                parked[key] = rows[1:]
        else:
            parked[key] = rows
    if parked:  # admit and park are separate calls: the leader may have finished, or failed, in between
        answers = _ask(actors, "park", {k: [_row_bytes(batch, i) for i in rows] for k, rows in parked.items()})
        for key, (verdict, value) in answers.items():
            if verdict == _HIT:
                hits.update((i, value) for i in parked[key])
            elif verdict == _LEAD:  # the leader is gone (not in flight, no answer): the first of these leads
                leaders.add(parked[key][0])
    keep = sorted({*hits, *leaders, *(i for i, k in enumerate(keys) if k is None)})
    batch = batch.append_column(schema.CACHE_KEY, pa.array([keys[i] if i in leaders else None for i in range(len(keys))], pa.string()))
    batch = batch.append_column(schema.CACHE_HIT, pa.array([hits.get(i) for i in range(len(keys))], pa.string()))
    marked = [schema.CACHE_HIT_MARK if i in hits else e for i, e in enumerate(errors)]
    batch = batch.set_column(batch.schema.get_field_index(schema.ERROR), schema.ERROR, pa.array(marked, pa.string()))
    return batch.take(pa.array(keep, pa.int64())) if len(keep) < batch.num_rows else batch


def restore_batch(batch: pa.Table, actors: list[Any], result_types: pa.Schema) -> pa.Table:
    """Fill in hits, publish leaders' answers, and add the rows parked on them."""
    keys = batch.column(schema.CACHE_KEY).to_pylist()
    hits = batch.column(schema.CACHE_HIT).to_pylist()
    # A backend may leave out result columns it has no use for (a head writes no `reasoning`).
    results = batch.select([f.name for f in result_types if f.name in batch.column_names]).to_pylist()
    for i, hit in enumerate(hits):
        if hit is not None:
            results[i] = _reused(json.loads(hit))
    published = {k: _entry(results[i]) for i, k in enumerate(keys) if k is not None}
    returned = _ask(actors, "publish", published) if published else {}
    out = batch.drop_columns([schema.CACHE_KEY, schema.CACHE_HIT])
    for field in result_types:
        values = pa.array([r.get(field.name) for r in results], field.type)
        index = out.schema.get_field_index(field.name)
        out = out.set_column(index, field, values) if index >= 0 else out.append_column(field, values)
    parked = [_parked_row(blob, results[i], out.column_names, result_types)
              for i, key in enumerate(keys) for blob in returned.get(key) or ()]
    # A parked row comes from another block, whose columns may differ in type from this one's:
    # a column with only nulls here is of Arrow's null type, and takes the parked row's type.
    return pa.concat_tables([out, *parked], promote_options="permissive") if parked else out


def _parked_row(blob: bytes, leader: dict[str, Any], columns: list[str], result_types: pa.Schema) -> pa.Table:
    """A parked row as it was admitted (its own columns, those this block has) with its leader's result."""
    row = pa.ipc.open_stream(blob).read_all()
    own = row.select([c for c in row.column_names if c in columns and c not in result_types.names])
    copied = _copied(leader)
    for field in result_types:
        own = own.append_column(field, pa.array([copied.get(field.name)], field.type))
    return own


def _reused(entry: dict[str, Any]) -> dict[str, Any]:
    """A result row for an answer given before (or a failure earlier in this run): no tokens spent, `cached`."""
    return schema.empty_result(**{k: entry.get(k) for k in (*_STORED, schema.ERROR)}, cached=True)


def _copied(result: dict[str, Any]) -> dict[str, Any]:
    """A parked row's result: its leader's, error included, with no tokens spent, `cached`."""
    return {**result, schema.INPUT_TOKENS: 0, schema.OUTPUT_TOKENS: 0, schema.CACHED: True}


def _entry(result: dict[str, Any]) -> tuple[bool, str] | None:
    """What a leader publishes: (stored, its JSON). A label is stored; a failure (an error,
    or no label) is kept by the actor for this run only, error included; an answer not in
    yet (`schema.DEFERRED`, batch mode) is neither: None, the next pass asks again."""
    if result.get(schema.ERROR) == schema.DEFERRED:
        return None
    failed = result.get(schema.ERROR) is not None or result.get(schema.LABEL) is None
    columns = (*_STORED, schema.ERROR) if failed else _STORED
    entry = {k: result.get(k) for k in columns}
    if failed and entry[schema.ERROR] is None:
        entry[schema.ERROR] = schema.UNPARSEABLE
    return not failed, json.dumps(entry, ensure_ascii=False)


def _row_bytes(batch: pa.Table, i: int) -> bytes:
    sink = pa.BufferOutputStream()
    row = batch.slice(i, 1)
    with pa.ipc.new_stream(sink, row.schema) as writer:
        writer.write_table(row)
    return sink.getvalue().to_pybytes()


# -- the cache actors -----------------------------------------------------------------------


class CacheShard:
    """One cache actor: the entries of buckets `b % shards == shard`, the keys whose leader is
    in flight and the rows parked on them. Its methods run one at a time (no races)."""

    def __init__(self, root: str, shard: int, shards: int):
        self.root, self.shard, self.shards = root, shard, shards
        self.done: dict[str, str] | None = None
        self.failed: dict[str, str] = {}
        """Keys whose leader failed in this run -> the failure: later rows of the key get it too."""
        self.pending: dict[str, list[bytes]] = {}
        self.new: list[tuple[str, str]] = []
        self.counts: Counter = Counter()

    def _buckets(self) -> list[int]:
        return [b for b in range(BUCKETS) if b % self.shards == self.shard]

    def _load(self) -> dict[str, str]:
        if self.done is None:
            import pyarrow.parquet as pq

            fs, root = storage.fs_path(self.root)
            self.done = {}
            for b in self._buckets():
                for path in sorted(fs.glob(f"{root}/b{b:02d}/*.parquet")):
                    with fs.open(path, "rb") as f:
                        table = pq.read_table(f, columns=["key", "result"])
                    self.done.update(zip(table.column("key").to_pylist(), table.column("result").to_pylist()))
            self.counts["entries_loaded"] = len(self.done)
        return self.done

    def admit(self, keys: dict[str, None]) -> dict[str, tuple[str, str | None]]:
        """Per key: a hit (its answer), lead (the caller asks the model), or park (a leader is in flight)."""
        done = self._load()
        out: dict[str, tuple[str, str | None]] = {}
        for key in keys:
            if key in done:
                out[key] = (_HIT, done[key])
                self.counts["hits"] += 1
            elif key in self.failed:
                out[key] = (_HIT, self.failed[key])
                self.counts["failures_reused"] += 1
            elif key in self.pending:
                out[key] = (_PARK, None)
            else:
                self.pending[key] = []
                out[key] = (_LEAD, None)
                self.counts["misses"] += 1
        return out

    def park(self, rows: dict[str, list[bytes]]) -> dict[str, tuple[str, str | None]]:
        """Hold rows until their key's leader publishes; a key no longer in flight is answered now."""
        done = self._load()
        out: dict[str, tuple[str, str | None]] = {}
        for key, blobs in rows.items():
            if key in self.pending:
                self.pending[key].extend(blobs)
                out[key] = (_PARK, None)
                self.counts["duplicates"] += len(blobs)
            elif key in done:
                out[key] = (_HIT, done[key])
                self.counts["hits"] += len(blobs)
            elif key in self.failed:
                out[key] = (_HIT, self.failed[key])
                self.counts["failures_reused"] += len(blobs)
            else:
                self.pending[key] = blobs[1:]
                out[key] = (_LEAD, None)
                self.counts["misses"] += 1
                self.counts["duplicates"] += len(blobs) - 1
        return out

    def publish(self, answers: dict[str, tuple[bool, str] | None]) -> dict[str, list[bytes]]:
        """Leaders' answers as (stored, JSON), or None when deferred (`_entry`); returns the rows parked on each key."""
        done = self._load()
        released: dict[str, list[bytes]] = {}
        for key, entry in answers.items():
            released[key] = self.pending.pop(key, [])
            if entry is None:  # deferred: forgotten, its parked rows take the deferral too
                continue
            stored, answer = entry
            if not stored:
                self.failed[key] = answer
            elif key not in done:
                done[key] = answer
                self.new.append((key, answer))
        if len(self.new) >= FLUSH_EVERY:
            self.flush()
        return released

    def flush(self) -> int:
        """Append the new answers to the store, one file per bucket; returns how many."""
        import pyarrow.parquet as pq

        if not self.new:
            return 0
        fs, root = storage.fs_path(self.root)
        by_bucket: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for key, answer in self.new:
            by_bucket[bucket(key)].append((key, answer))
        for b, entries in by_bucket.items():
            fs.makedirs(f"{root}/b{b:02d}", exist_ok=True)
            table = pa.table({"key": [k for k, _ in entries], "result": [a for _, a in entries]})
            with fs.open(f"{root}/b{b:02d}/{uuid.uuid4().hex}.parquet", "wb") as f:
                pq.write_table(table, f)
        stored, self.new = len(self.new), []
        self.counts["entries_stored"] += stored
        return stored

    def stats(self) -> dict[str, int]:
        return dict(self.counts)
