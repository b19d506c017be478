"""Fuzzing the reading path: whatever file a lake holds, the answer the README promises.

Hypothesis writes JSONL, CSV and Parquet files (sometimes gzip'd) with random mixes of
types, nulls, unicode (CJK, emoji, control characters, NUL, lone surrogates as JSON escapes
or raw), very long and empty values, duplicate and missing ids, extra columns that come and
go, invalid bytes and broken lines, split over random files; then runs the job's checks,
the read on a real local Ray and the prepare step (no model).

The generator knows which of its inputs are valid ("Messy inputs" in docs/spec.md says what
is read and what is refused), and the test holds the reader to it:

- a valid input gives one output row per input row, unique ids, the same (id, text) when
  derived again, and an `error` only of the kinds the reading path gives;
- an invalid one gives a `RayclsError` whose message names a file that holds a fault (and
  its line where it has one) and is bounded in length.

A reader that refuses good input fails, and so does one that reads bad input, a pyarrow or
Unicode traceback, or a lost or doubled row. CI runs a few examples; `RAYCLS_FUZZ_EXAMPLES=500`
runs more (RELIABILITY.md has a large run's figures).
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
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from raycls import schema
from raycls.config import InputSpec
from raycls.errors import RayclsError
from raycls.inputs.datasource import InputDatasource, check_input, resolve_input
from raycls.job.pipeline import prepare_batch

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
_id = st.one_of(st.integers(0, 6), st.sampled_from(["x1", "x2", "x1#2", "k:1"]))
"""Ids as an id column may hold them (a number or a non-empty string): valid, though they may repeat."""
_bad_id = st.sampled_from(["missing", None, "", [1], {"a": 1}])
"""Ids refused with a message naming the file (JSON arrays and objects only where the format keeps them)."""
_any_id = st.one_of(st.none(), _id, st.just(""), st.lists(st.integers(), max_size=1))
"""What an `id` column holds when it is not the id column: anything, it is just another column."""
_loose = st.fixed_dictionaries({"id": _any_id, "text": _value}, optional={"label": _value, "extra": _value})
_row = st.one_of(_loose, _loose, _loose, st.fixed_dictionaries({}, optional={"id": _any_id, "text": _value, "label": _value, "extra": _value}))
"""Without an id column: most rows carry an id and a text (of any type); some lack any key."""
_with_id = st.fixed_dictionaries({"id": _id}, optional={"text": _value, "label": _value, "extra": _value})
"""With an id column, every valid row has a valid id."""
BAD_BYTE_ID = "bad-byte"
MARK = "@@not-utf8@@"


@st.composite
def inputs(draw):
    """(files {name: bytes}, spec options, rows in, files that must be refused) of one generated input.

    `bad` is empty for a valid input; else the names that a clean error may name (the input
    root too, `""`, when ids repeat under `duplicate_ids: error`).
    """
    fmt = draw(st.sampled_from(["jsonl", "csv", "parquet"]))
    options = {
        "id_column": draw(st.sampled_from([None, "id"])),
        "duplicate_ids": draw(st.sampled_from(["error", "keep_first", "suffix"])),
        "encoding_errors": draw(st.sampled_from(["error", "replace"])),
        "gold_column": draw(st.sampled_from([None, "label"])),
    }
    rows = draw(st.lists(_with_id if options["id_column"] else _row, min_size=1, max_size=12))
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=2)))
    parts = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)])]
    if len(parts) > 1:  # several files: only the columns whose type is fixed (text, id, gold) may vary
        fixed = {"text", options["id_column"], options["gold_column"]}
        parts = [[{k: v for k, v in r.items() if k in fixed} for r in p] for p in parts]
    gz = fmt != "parquet" and draw(st.booleans())
    files, bad, ids, total = {}, set(), [], 0
    for i, part in enumerate(parts):
        name = f"p{i}.{fmt}" + (".gz" if gz else "")
        data, rows_in, columns, faulty = _encode(fmt, part, options, draw)
        files[name] = gzip.compress(data) if gz else data
        total += rows_in
        needed = ["text", *[c for c in (options["id_column"], options["gold_column"]) if c]]
        if faulty or (i == 0 and not set(needed) <= columns) or (options["id_column"] and rows_in and "id" not in columns):
            bad.add(name)  # the first file sets the columns; every file with rows needs the id column
        if options["id_column"]:
            ids += [str(r["id"]) for r in part if isinstance(r.get("id"), (int, str))]
            ids += [BAD_BYTE_ID] * (rows_in - len(part))  # the row `_encode` added
    if options["duplicate_ids"] == "error" and len(set(ids)) < len(ids):
        bad.add("")
    return files, options, total, bad


def _encode(fmt: str, rows: list[dict], options: dict, draw) -> tuple[bytes, int, set[str], bool]:
    """A file's bytes, its rows, its columns, and whether it must be refused."""
    with_ids, replace = options["id_column"] is not None, options["encoding_errors"] == "replace"
    faults = [None] * 6 + ["bad_byte", "broken_line", "bom"] + ["bad_id"] * with_ids
    fault = draw(st.sampled_from(faults if fmt != "parquet" else [None] * 6 + ["bad_id"] * with_ids))
    rows = [dict(r) for r in rows]
    if fault == "bad_id" and rows:
        # CSV and Parquet keep no arrays or objects: they arrive as text, a valid id
        bad = draw(_bad_id.filter(lambda v: fmt == "jsonl" or not isinstance(v, (list, dict))))
        row = rows[draw(st.integers(0, len(rows) - 1))]
        row.pop("id") if bad == "missing" else row.update(id=bad)
    columns = {k for r in rows for k in r}
    if fmt == "parquet":
        names = sorted(columns)
        table = pa.table({c: _parquet_column([r.get(c) for r in rows]) for c in names}) if names else pa.table({"text": pa.nulls(len(rows), pa.string())})
        codec = draw(st.sampled_from(["snappy", "zstd", "none"]))
        sink = io.BytesIO()
        try:
            pq.write_table(table, sink, compression=codec)
        except (pa.ArrowException, ValueError):  # what Parquet cannot hold (an empty struct): write it as text
            sink = io.BytesIO()
            pq.write_table(pa.table({c: _parquet_column([_as_text(r.get(c)) for r in rows]) for c in table.column_names}), sink, compression=codec)
        return sink.getvalue(), len(rows), set(table.column_names), fault == "bad_id" and bool(rows)
    odd = {"id": BAD_BYTE_ID, "text": MARK} if fault == "bad_byte" else None  # its text becomes Latin-1 "café"
    if odd:
        rows.insert(draw(st.integers(0, len(rows))), odd)
        columns |= {"id", "text"}
    if fmt == "jsonl":
        ascii_only = draw(st.booleans())
        records = [json.dumps(r, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + b"\n" for r in rows]
        broken, first = b'{"text": oops\n', 0
    else:
        names = sorted(columns) or ["text"]
        columns = set(names)
        records = [_csv_record(names)] + [_csv_record(["" if r.get(c) is None else (r[c] if isinstance(r[c], str) else json.dumps(r[c])) for c in names]) for r in rows]
        broken, first = b",".join([b"x"] * 9) + b"\r\n", 1  # more fields than any header: not a record of this file
    if fault == "broken_line":  # between records (a CSV record may span lines)
        records.insert(draw(st.integers(first, len(records))), broken)
    data = b"".join(records).replace(MARK.encode(), b"caf\xe9")
    undecodable = fault == "bad_byte" or _not_text(data, fmt)
    refused = fault == "broken_line" or (undecodable and not replace) or (fault == "bad_id" and bool(rows))
    return (b"\xef\xbb\xbf" + data if fault == "bom" else data), len(rows), columns, refused


def _csv_record(values: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().encode("utf-8", "surrogatepass")


def _not_text(data: bytes, fmt: str) -> bool:
    """Bytes that are not UTF-8, or JSON strings holding a lone surrogate (as `\\ud800` escapes)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    if fmt != "jsonl":
        return False
    strings = []

    def walk(value):
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k), walk(v)

    for line in text.split("\n"):
        if line.strip():
            try:
                walk(json.loads(line))
            except json.JSONDecodeError:
                pass
    return not all(_encodable(s) for s in strings)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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


OPTIONS = {"id_column": "id", "duplicate_ids": "error", "encoding_errors": "error", "gold_column": "label"}
VALID_EXAMPLES = [
    # numbers, booleans, a list and an object as texts and gold labels, ids of two types
    ({"p0.jsonl": b'{"id": 1, "text": 42, "label": true}\n{"id": "x2", "text": ["a", {"b": 1}], "label": 2.5}\n'
                  b'{"id": 3, "text": {"k": "\xe4\xb8\xad"}, "extra": [1]}\n'}, OPTIONS, 3, set()),
    # CSV: a text of digits, a quoted newline, a BOM, in a gzip'd file
    ({"p0.csv.gz": gzip.compress(b'\xef\xbb\xbfid,label,text\r\n7,1,12345\r\nx1,,"two\nlines"\r\n')}, OPTIONS, 2, set()),
    # a byte that is not UTF-8, under encoding_errors: replace (the row is flagged, not dropped)
    ({"p0.jsonl": b'{"id": 0, "text": "caf\xe9"}\n{"id": 1, "text": "fine"}\n'}, {**OPTIONS, "encoding_errors": "replace", "gold_column": None}, 2, set()),
]
"""Valid inputs every run sees, whatever hypothesis draws: a reader that refuses one fails."""


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=EXAMPLES <= 25)
@given(case=inputs())
@example(case=VALID_EXAMPLES[0])
@example(case=VALID_EXAMPLES[1])
@example(case=VALID_EXAMPLES[2])
def test_valid_inputs_are_labelled_and_invalid_ones_refused_naming_the_file(ray_local, case):
    files, options, rows_in, bad = case
    root = Path(tempfile.mkdtemp(prefix="raycls-fuzz-"))
    try:
        for name, data in files.items():
            (root / name).write_bytes(data)
        spec = InputSpec(path=str(root), **options)
        try:
            got = _read_prepared(spec, via_ray=True)
        except RayclsError as exc:
            message = str(exc)
            assert bad, f"a valid input was refused: {message[:2000]}"
            assert type(exc).__module__ == "raycls.errors", f"a wrapped error reached the caller: {type(exc)}"
            assert "\n" not in message.strip() and len(message) <= MAX_MESSAGE, message[:2000]
            named = [name for name in files if name in message]
            assert set(named) & bad or ("" in bad and str(root) in message), f"names no faulty file {sorted(bad)}: {message[:2000]}"
            line = getattr(exc, "line", None)
            assert line is None or f":{line}:" in message
            event(f"clean error: {message.split(': ', 1)[1][:40] if ': ' in message else message[:40]}")
            return
        assert not bad, f"an input with faults in {sorted(bad)} was read without an error"
        assert len(got) == rows_in, "rows out != rows in"
        ids = [r[0] for r in got]
        assert len(set(ids)) == len(ids), "ids repeat"
        assert {r[2] for r in got} <= READ_ERRORS
        assert got == _read_prepared(spec, via_ray=False), "ids or texts differ when derived again"
        event(f"rows out; flags {sorted({str(r[2]) for r in got})}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
