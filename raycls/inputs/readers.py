"""Parsing one input file into Arrow, with the types raycls needs whatever the file holds.

Data lakes hold files that no one typed: a `text` column with a number on one line, an id
that is `1` here and `"x2"` there, a Latin-1 byte in a UTF-8 file, gzip'd JSONL. Every one
of them gets a clear answer here, never a pyarrow traceback:

- **Compression** (`.gz`, `.bz2`, `.zst`, `.xz`) is undone from the file name, so
  `part-0.jsonl.gz` reads as JSONL. Parquet's own codecs are pyarrow's business.
- **Encoding**: JSONL and CSV are decoded with `input.encoding` (UTF-8 by default, a BOM
  accepted). A line that does not decode is an `InputError` naming file and line, or, with
  `input.encoding_errors: replace`, is decoded with U+FFFD and its row flagged
  `decode_error`. JSON's `\\ud800`-style escapes of lone surrogates are undecodable text too
  and get the same answer.
- **Types**: the columns used as text (the text template's columns and the gold column) and
  the id column are read as strings on every file and format. A number becomes its string
  form (`1` → `"1"`, `1.0` → `"1"` as Arrow writes it, `true` → `"true"`). A list or object
  in a text column is rendered as compact JSON: it is text the user put there, the model can
  read it, and the row keeps its place (rows out = rows in). A list or object as an *id* is
  refused, naming file, line and column: an id has to be a scalar that the user can recognise
  and join back on. Other JSONL columns keep the type Arrow infers for them; one whose lines
  disagree (a number here, a string there) is read as text rather than failing.
"""

from __future__ import annotations

import codecs
import io
import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raycls import schema
from raycls.errors import InputError, excerpt

if TYPE_CHECKING:
    import fsspec

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz"}
"""File-name suffixes read through a decompressor (fsspec's), before the format is parsed."""
_UTF8 = codecs.lookup("utf-8").name


@dataclass(frozen=True)
class ReadOptions:
    """What a reader needs to know of the spec: which columns are text, and how to decode."""

    text_columns: tuple[str, ...] = ()
    """Columns read as strings (the text template's columns, the gold column)."""
    id_column: str | None = None
    """Read as strings too; a list or object there is an error."""
    encoding: str = "utf-8"
    encoding_errors: str = "error"

    @classmethod
    def from_spec(cls, spec: Any) -> "ReadOptions":
        from raycls.prompting.prompts import template_columns

        text = [*template_columns(spec.text), *([spec.gold_column] if spec.gold_column else [])]
        return cls(tuple(dict.fromkeys(text)), spec.id_column, spec.encoding, spec.encoding_errors)

    @property
    def string_columns(self) -> tuple[str, ...]:
        return (*self.text_columns, *([self.id_column] if self.id_column else []))


def split_name(path: str) -> tuple[str, str | None]:
    """(format extension, compression) of a file name: `a.jsonl.gz` → (`.jsonl`, `gzip`)."""
    stem, ext = posixpath.splitext(path)
    compression = COMPRESSIONS.get(ext.lower())
    if compression:
        ext = posixpath.splitext(stem)[1]
    return ext.lower(), compression


def decompress(path: str, data: bytes) -> bytes:
    """The file's bytes with its compression (from its name) undone."""
    compression = split_name(path)[1]
    if compression is None:
        return data
    from fsspec.compression import compr

    if compression not in compr:
        raise InputError(path, f"reading {compression} files needs the 'zstandard' package (pip install zstandard)")
    try:
        with compr[compression](io.BytesIO(data), mode="rb") as f:
            return f.read()
    except Exception as exc:  # each codec library has its own error class  # noqa: BLE001
        raise InputError(path, f"not a valid {compression} file: {excerpt(str(exc), 120)}") from None


def parse_file(path: str, fmt: str, data: bytes, options: ReadOptions, columns: list[str] | None = None) -> pa.Table:
    """One file's rows as Arrow: string id and text columns, `_read_error` where rows were flagged.

    `columns` narrows what Parquet reads (those of them the file has); text formats parse whole lines.
    """
    data = decompress(path, data)
    if fmt == "parquet":
        try:
            parquet = pq.ParquetFile(io.BytesIO(data))
            names = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
            table = parquet.read(columns=names)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(path, f"not a valid parquet file: {excerpt(str(exc), 160)}") from None
        return _as_text_columns(path, table, options)
    text, bad_lines = decode(path, data, options)
    if fmt == "csv":
        return _parse_csv(path, text, bool(bad_lines), options)
    return _parse_jsonl(path, text, bad_lines, options)


def decode(path: str, data: bytes, options: ReadOptions) -> tuple[str, set[int]]:
    """The file as text, and the numbers of the lines that did not decode (replaced with U+FFFD)."""
    encoding = codecs.lookup(options.encoding).name
    if encoding == _UTF8 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode(encoding), set()
    except UnicodeDecodeError as exc:
        if options.encoding_errors != "replace":
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            raise InputError(path, f"not valid {options.encoding} (byte {data[exc.start:exc.start + 1]!r} at byte {column} of the line); "
                             "set input.encoding (e.g. latin-1, gb18030) or input.encoding_errors: replace", line=line) from None
    lines, bad = [], set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode(encoding))
        except UnicodeDecodeError:
            lines.append(raw.decode(encoding, errors="replace"))
            bad.add(number)
    return "\n".join(lines), bad


# -- JSONL: our own parser, columns built one at a time with explicit types ----------------


def _parse_jsonl(path: str, text: str, bad_lines: set[int], options: ReadOptions) -> pa.Table:
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"malformed JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line", line=number) from None
        except RecursionError:
            raise InputError(path, "JSON nested too deeply", line=number) from None
        if not isinstance(row, dict):
            raise InputError(path, f"expected a JSON object, got {type(row).__name__}", line=number)
        rows.append(row)
        lines.append(number)
    flags = [number in bad_lines for number in lines]
    names = list(dict.fromkeys(key for row in rows for key in row))
    arrays = []
    for name in names:
        values = [row.get(name) for row in rows]
        if name in options.string_columns:
            arrays.append(_text_array(path, name, values, lines, flags, options))
        else:
            arrays.append(_inferred_array(path, name, values, lines, flags, options))
    table = pa.table(dict(zip([_clean_name(n) for n in names], arrays))) if names else pa.table({"_": pa.nulls(len(rows))}).drop_columns(["_"])
    return _with_flags(table, flags)


def _inferred_array(path: str, name: str, values: list, lines: list[int], flags: list[bool], options: ReadOptions) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return _text_array(path, name, values, lines, flags, options)  # lines disagree on the type: read it as text


def _text_array(path: str, name: str, values: list, lines: list[int] | None, flags: list[bool], options: ReadOptions) -> pa.Array:
    """`values` as a string array: numbers in their string form, lists/objects as JSON (ids: an error)."""
    out: list[str | None] = []
    for i, value in enumerate(values):
        if value is None or isinstance(value, str):
            out.append(value)
            continue
        if isinstance(value, (list, dict)) and name == options.id_column:
            raise InputError(path, f"column {name!r}: an id must be a string or a number, got a JSON {'array' if isinstance(value, list) else 'object'} "
                             f"{excerpt(json.dumps(value, ensure_ascii=False), 60)}", line=lines[i] if lines else None)
        out.append(scalar_text(value))
    try:
        return pa.array(out, pa.string())
    except UnicodeEncodeError:  # lone surrogates (JSON `\ud800` escapes): not text
        pass
    for i, value in enumerate(out):
        if value is not None and not _encodable(value):
            if options.encoding_errors != "replace":
                where = f"line {lines[i]}" if lines else f"row {i}"
                raise InputError(path, f"column {name!r} holds a lone UTF-16 surrogate escape, which is not text ({where}); "
                                 "fix the producer or set input.encoding_errors: replace", line=lines[i] if lines else None)
            out[i] = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            flags[i] = True
    return pa.array(out, pa.string())


def scalar_text(value: Any) -> str:
    """A non-string value's text: JSON for lists, objects and booleans; numbers as Arrow casts them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (bool, list, dict)) or value is None:
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _clean_name(name: str) -> str:
    return name if _encodable(name) else name.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _with_flags(table: pa.Table, flags: list[bool]) -> pa.Table:
    if not any(flags):
        return table
    codes = pa.array([schema.DECODE_ERROR if f else None for f in flags], pa.string())
    return table.append_column(schema.READ_ERROR, codes)


# -- CSV and Parquet: pyarrow's readers, then the text columns cast ---------------------------


def _parse_csv(path: str, text: str, had_bad_lines: bool, options: ReadOptions) -> pa.Table:
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in options.string_columns})
    try:
        table = pacsv.read_csv(io.BytesIO(text.encode("utf-8")), convert_options=convert)
    except pa.ArrowException as exc:
        raise InputError(path, f"not a valid csv file: {excerpt(str(exc), 160)}") from None
    flags = [False] * table.num_rows
    if had_bad_lines:  # rows are not lines in CSV (quoted newlines): flag the rows that hold a replacement
        for column in table.columns:
            if pa.types.is_string(column.type):
                for i, value in enumerate(column.to_pylist()):
                    flags[i] = flags[i] or (value is not None and "\ufffd" in value)
    return _with_flags(table, flags)


def _as_text_columns(path: str, table: pa.Table, options: ReadOptions) -> pa.Table:
    """Parquet: the id and text columns cast to string (JSON for nested values)."""
    flags = [False] * table.num_rows
    for name in options.string_columns:
        if name not in table.column_names or pa.types.is_string(table.schema.field(name).type):
            continue
        column = table.column(name)
        try:
            cast = column.cast(pa.string())
        except (pa.ArrowException, UnicodeDecodeError):
            cast = _text_array(path, name, column.to_pylist(), None, flags, options)
        table = table.set_column(table.schema.get_field_index(name), name, cast)
    return _with_flags(table, flags)


def read_table(fs: fsspec.AbstractFileSystem, path: str, fmt: str, data: bytes | None = None,
               options: ReadOptions | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read one file into Arrow (see `raycls.inputs.readers`); errors name the file and line."""
    if data is None:
        with fs.open(path, "rb") as f:
            data = f.read()
    return parse_file(path, fmt, data, options or ReadOptions(), columns)
