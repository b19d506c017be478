"""Rows out = rows in, checked on every run before it is marked finished.

The promise the product rests on is that every input row is in the output exactly once.
Backends and resume are built for it, but a bug or a lost batch must not produce an
output marked finished with rows missing: so, after the write, the job compares the
set of ids read with the set of ids written (all attempts together).

Both sides are reduced on the cluster to a digest per hash bucket: the count of ids and
the wrapping sum of a 64-bit hash of each id, over `BUCKETS` buckets. That is a few
kilobytes per block whatever the row count, and two equal sets always give equal
digests; unequal sets give unequal ones except with negligible probability. Only when a
bucket differs are the ids of the differing buckets fetched to name what is missing and
what is extra, so the exact answer costs a fraction of the data and the common case
costs one pass over the id columns (see BENCHMARKS.md for the figure at 1M ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from raycls import schema
from raycls.errors import RowCountError

BUCKETS = 1024
EXAMPLES = 5
"""Ids quoted in a mismatch message."""


def id_hashes(ids: list[str]) -> np.ndarray:
    """A stable 64-bit hash of each id: pandas' SipHash with its fixed key, vectorised, and
    the same in every process (unlike `hash`)."""
    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)


def block_digest(batch: pa.Table) -> pa.Table:
    """Per bucket: how many ids of this block fall in it and the wrapping sum of their hashes."""
    hashes = id_hashes(batch.column(schema.ID).to_pylist())
    buckets = (hashes % np.uint64(BUCKETS)).astype(np.int64)
    counts = np.bincount(buckets, minlength=BUCKETS).astype(np.int64)
    sums = np.zeros(BUCKETS, dtype=np.uint64)
    np.add.at(sums, buckets, hashes)  # uint64 addition wraps: an order-free sum mod 2^64
    return pa.table({"count": [counts.tolist()], "sum": [sums.tolist()]},
                    schema=pa.schema([("count", pa.list_(pa.int64())), ("sum", pa.list_(pa.uint64()))]))


@dataclass(frozen=True)
class Digest:
    counts: np.ndarray
    sums: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.counts.sum())


def digest(ds) -> Digest:
    """The digest of a Dataset with an `id` column, reduced on the cluster."""
    counts = np.zeros(BUCKETS, dtype=np.int64)
    sums = np.zeros(BUCKETS, dtype=np.uint64)
    parts = ds.select_columns([schema.ID]).map_batches(block_digest, batch_format="pyarrow", batch_size=None)
    for part in parts.iter_batches(batch_format="pyarrow", batch_size=None):
        for c, s in zip(part.column("count").to_pylist(), part.column("sum").to_pylist()):
            counts += np.asarray(c, dtype=np.int64)
            sums += np.asarray(s, dtype=np.uint64)
    return Digest(counts, sums)


def _ids_in_buckets(batch: pa.Table, buckets: frozenset[int]) -> pa.Table:
    ids = batch.column(schema.ID).to_pylist()
    keep = [i for i, h in zip(ids, id_hashes(ids)) if int(h % np.uint64(BUCKETS)) in buckets]
    return pa.table({schema.ID: pa.array(keep, pa.string())})


def ids_in_buckets(ds, buckets: set[int]) -> list[str]:
    """The ids of `ds` (duplicates kept) whose hash falls in one of `buckets`."""
    picked = ds.select_columns([schema.ID]).map_batches(
        _ids_in_buckets, fn_kwargs={"buckets": frozenset(buckets)}, batch_format="pyarrow", batch_size=None)
    return [i for part in picked.iter_batches(batch_format="pyarrow", batch_size=None) for i in part.column(schema.ID).to_pylist()]


def check_rows(read, written) -> int:
    """Raise RowCountError unless the ids written are exactly the ids read; returns the row count.

    `read` and `written` are Datasets with an `id` column (the input without any resume
    filter, and every data file of the output).
    """
    want, got = digest(read), digest(written)
    differ = {int(b) for b in np.flatnonzero((want.counts != got.counts) | (want.sums != got.sums))}
    if not differ:
        return got.rows
    from collections import Counter

    read_ids = Counter(ids_in_buckets(read, differ))
    written_ids = Counter(ids_in_buckets(written, differ))
    missing = sorted(set(read_ids) - set(written_ids))
    extra = sorted(set(written_ids) - set(read_ids))
    repeated = sorted(i for i, n in written_ids.items() if n > read_ids.get(i, 0) and i in read_ids)
    raise RowCountError(want.rows, got.rows, missing, extra, repeated)
