"""Fuzzing the reading path: whatever file a lake holds, one clean error or one row per row.

Hypothesis writes JSONL, CSV and Parquet files (sometimes gzip'd) with random mixes of
types, nulls, unicode (CJK, emoji, control characters, NUL, lone surrogates as JSON escapes
or raw), very long and empty values, duplicate and missing ids, extra columns that come and
go, invalid bytes and broken lines, split over random files; then runs the job's checks,
the read on a real local Ray and the prepare step (no model). For every input exactly one of:

- a `RayclsError` whose message names one of the files (and its line where it has one) and
  is bounded in length;
- one output row per input row, unique ids, the same (id, text) when derived again, and an
  `error` only of the kinds the reading path gives.

Anything else (a pyarrow or Unicode traceback, a lost or doubled row) fails. CI runs a few
examples; `RAYCLS_FUZZ_EXAMPLES=500` runs more (RELIABILITY.md has a large run's figures).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from raycls import schema
from raycls.config import InputSpec
from raycls.errors import RayclsError
from raycls.io import InputDatasource, check_input, resolve_input
from raycls.pipeline import prepare_batch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(3600)]

EXAMPLES = int(os.environ.get("RAYCLS_FUZZ_EXAMPLES", "25"))
MAX_MESSAGE = 800
READ_ERRORS = {None, schema.EMPTY_TEXT, schema.DECODE_ERROR, schema.DUPLICATE_ID}

_chars = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from("中文字符测试😀🎉\x00\x01\x1f\x7f\u2028\u0085\r\n\t\"',{}[]\\#:\ufeff\ufffd"),
    st.sampled_from(["\ud800", "\udfff", "\ud83d"]),  # lone surrogates
)
_text = st.one_of(st.text(_chars, max_size=20), st.builds("{}\ud83d{}".format, st.text(max_size=3), st.text(max_size=3)))
_scalar = st.one_of(
    st.none(), _text, st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.just(""), st.builds(lambda n, c: c * n, st.integers(1000, 30_000), st.sampled_from("x中")),
)
_value = st.one_of(_scalar, st.lists(_scalar, max_size=3), st.dictionaries(st.sampled_from("ab"), _scalar, max_size=2))
_id = st.one_of(st.none(), st.integers(0, 6), st.sampled_from(["x1", "x2", "x1#2", "", "k:1"]), st.lists(st.integers(), max_size=1))
_full = st.fixed_dictionaries({"id": _id, "text": _value}, optional={"label": _value, "extra": _value})
_row = st.one_of(_full, _full, _full, st.fixed_dictionaries({}, optional={"id": _id, "text": _value, "label": _value, "extra": _value}))
"""Most rows carry an id and a text (of any type); some lack any key."""


@st.composite
def inputs(draw):
    """(files {name: bytes}, spec options, rows per file) of one generated input."""
    fmt = draw(st.sampled_from(["jsonl", "csv", "parquet"]))
    rows = draw(st.lists(_row, min_size=1, max_size=12))
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=2)))
    parts = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)])]
    gz = fmt != "parquet" and draw(st.booleans())
    files, counts = {}, {}
    for i, part in enumerate(parts):
        name = f"p{i}.{fmt}" + (".gz" if gz else "")
        data, n = _encode(fmt, part, draw)
        files[name] = gzip.compress(data) if gz else data
        counts[name] = n
    options = {
        "id_column": draw(st.sampled_from([None, "id"])),
        "duplicate_ids": draw(st.sampled_from(["error", "keep_first", "suffix"])),
        "encoding_errors": draw(st.sampled_from(["error", "replace"])),
        "gold_column": draw(st.sampled_from([None, "label"])),
    }
    return files, options, counts


def _encode(fmt: str, rows: list[dict], draw) -> tuple[bytes, int | None]:
    """A file's bytes and its row count (None when a fault was injected: any answer but a traceback goes)."""
    fault = draw(st.sampled_from([None] * 6 + ["bad_byte", "broken_line", "bom"]))
    if fmt == "parquet":
        columns = sorted({k for r in rows for k in r})
        table = pa.table({c: _parquet_column([r.get(c) for r in rows]) for c in columns}) if columns else pa.table({"text": pa.nulls(len(rows), pa.string())})
        codec = draw(st.sampled_from(["snappy", "zstd", "none"]))
        sink = io.BytesIO()
        try:
            pq.write_table(table, sink, compression=codec)
        except (pa.ArrowException, ValueError):  # what Parquet cannot hold (an empty struct): write it as text
            sink = io.BytesIO()
            pq.write_table(pa.table({c: _parquet_column([_as_text(r.get(c)) for r in rows]) for c in table.column_names}), sink, compression=codec)
        return sink.getvalue(), len(rows)
    if fmt == "jsonl":
        ascii_only = draw(st.booleans())
        lines = [json.dumps(r, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") for r in rows]
    else:
        columns = sorted({k for r in rows for k in r}) or ["text"]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else (r[c] if isinstance(r[c], str) else json.dumps(r[c])) for c in columns])
        lines = out.getvalue().encode("utf-8", "surrogatepass").split(b"\n")
    if fault == "bad_byte":
        lines.insert(draw(st.integers(0, len(lines))), b'{"text": "caf\xe9"}' if fmt == "jsonl" else b"caf\xe9")
    elif fault == "broken_line":
        lines.insert(draw(st.integers(0, len(lines))), b'{"text": oops' if fmt == "jsonl" else b'"unclosed,quote')
    data = b"\n".join(lines) + (b"\n" if fmt == "jsonl" else b"")
    return (b"\xef\xbb\xbf" + data if fault == "bom" else data), (len(rows) if fault in (None, "bom") else None)


def _as_text(value) -> str | None:
    """A value as text Parquet can hold (lone surrogates replaced)."""
    text = None if value is None else (value if isinstance(value, str) else json.dumps(value))
    return None if text is None else text.encode("utf-8", "replace").decode()


def _parquet_column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return pa.array([_as_text(v) for v in values], pa.string())


def _read_prepared(spec: InputSpec, via_ray: bool) -> list[tuple]:
    import ray.data

    files = resolve_input(spec)
    check_input(spec, files)
    source = InputDatasource(spec, files)
    if via_ray:
        ds = ray.data.read_datasource(source).map_batches(prepare_batch, fn_kwargs={"text_template": spec.text}, batch_format="pyarrow")
        rows = ds.take_all()
    else:
        rows = [r for task in source.get_read_tasks(1) for block in task() for r in prepare_batch(block, spec.text).to_pylist()]
    return sorted((r[schema.ID], r[schema.TEXT], r[schema.ERROR]) for r in rows)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=EXAMPLES <= 25)
@given(case=inputs())
def test_any_input_gives_one_clean_error_or_one_row_per_row(ray_local, case):
    files, options, counts = case
    root = Path(tempfile.mkdtemp(prefix="raycls-fuzz-"))
    try:
        for name, data in files.items():
            (root / name).write_bytes(data)
        spec = InputSpec(path=str(root), **options)
        try:
            got = _read_prepared(spec, via_ray=True)
        except RayclsError as exc:
            message = str(exc)
            assert type(exc).__module__ == "raycls.errors", f"a wrapped error reached the caller: {type(exc)}"
            assert "\n" not in message.strip() and len(message) <= MAX_MESSAGE, message[:2000]
            assert any(name in message for name in files) or str(root) in message, message
            line = getattr(exc, "line", None)
            assert line is None or f":{line}:" in message
            event(f"clean error: {message.split(': ', 1)[1][:40] if ': ' in message else message[:40]}")
            return
        if all(n is not None for n in counts.values()):
            assert len(got) == sum(counts.values())
        ids = [r[0] for r in got]
        assert len(set(ids)) == len(ids), "ids repeat"
        assert {r[2] for r in got} <= READ_ERRORS
        assert got == _read_prepared(spec, via_ray=False), "ids or texts differ when derived again"
        event(f"rows out; flags {sorted({str(r[2]) for r in got})}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
