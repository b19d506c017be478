"""Reading inputs: formats, locations, stable ids, and errors that name the file, line or column."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.config import InputSpec
from raycls.errors import InputError
from raycls.inputs.datasource import check_input, read_rows, resolve_input

ROWS = [{"text": f"row {i}", "label": "a" if i % 2 else "b"} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ids_and_texts(ds):
    return sorted((r[schema.ID], r["text"]) for r in ds.take_all())


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match="no such file or directory") as err:
        resolve_input(InputSpec(path=str(tmp_path / "nope.jsonl")))
    assert err.value.path.endswith("nope.jsonl")


def test_empty_glob_says_nothing_was_found(tmp_path):
    with pytest.raises(InputError, match="no jsonl files found"):
        resolve_input(InputSpec(path=str(tmp_path / "*.jsonl"), format="jsonl"))


def test_unknown_extension_asks_for_the_format(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(InputError, match="set input.format"):
        resolve_input(InputSpec(path=str(tmp_path / "data.txt")))


def test_missing_column_lists_the_columns_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = InputSpec(path=str(path), text="body")
    with pytest.raises(InputError) as err:
        check_input(spec, resolve_input(spec))
    assert "missing column(s) ['body']" in str(err.value) and "['text', 'label']" in str(err.value)
    assert err.value.path.endswith("d.jsonl")


def test_missing_template_column_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = InputSpec(path=str(path), text="{title}. {text}")
    with pytest.raises(InputError, match=r"missing column\(s\) \['title'\]"):
        check_input(spec, resolve_input(spec))


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": "broken", \n')
    spec = InputSpec(path=str(tmp_path))
    with pytest.raises(InputError) as err:
        check_input(spec, resolve_input(spec))
    assert err.value.path.endswith("b.jsonl") and err.value.line == 2
    assert "b.jsonl:2" in str(err.value)
    assert good.exists()


def test_jsonl_line_that_is_not_an_object(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n[1, 2]\n')
    spec = InputSpec(path=str(bad))
    with pytest.raises(InputError, match="b.jsonl:2: expected a JSON object, got list"):
        check_input(spec, resolve_input(spec))


@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_reads_each_format_with_derived_ids(ray_local, tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    table = pa.Table.from_pylist(ROWS)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "jsonl":
        write_jsonl(path, ROWS)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    got = ids_and_texts(read_rows(InputSpec(path=str(path))))
    assert got == sorted((f"d.{fmt}:{i}", f"row {i}") for i in range(10))


@pytest.mark.ray
def test_directory_and_glob_give_the_same_stable_ids(ray_local, tmp_path):
    (tmp_path / "part").mkdir()
    write_jsonl(tmp_path / "part" / "one.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "part" / "two.jsonl", ROWS[4:])
    by_dir = ids_and_texts(read_rows(InputSpec(path=str(tmp_path / "part"))))
    by_glob = ids_and_texts(read_rows(InputSpec(path=str(tmp_path / "part" / "*.jsonl"))))
    assert by_dir == by_glob
    assert by_dir[0] == ("one.jsonl:0", "row 0") and len(by_dir) == 10
    assert ids_and_texts(read_rows(InputSpec(path=str(tmp_path / "part")))) == by_dir  # a rerun derives the same


@pytest.mark.ray
def test_id_column_is_used_and_input_columns_that_clash_are_renamed(ray_local, tmp_path):
    rows = [{"key": f"k{i}", "text": f"t{i}", "label": "a", "error": "theirs"} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    got = read_rows(InputSpec(path=str(path), id_column="key")).take_all()
    assert sorted(r[schema.ID] for r in got) == ["k0", "k1", "k2"]
    assert {"input_label", "input_error", "key"} <= set(got[0]) and "label" not in got[0]


@pytest.mark.ray
def test_reads_from_a_memory_filesystem(ray_local):
    fs = fsspec.filesystem("memory")
    with fs.open("/raycls-test/d.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    got = ids_and_texts(read_rows(InputSpec(path="memory://raycls-test/d.jsonl")))
    assert len(got) == 10 and got[0] == ("d.jsonl:0", "row 0")
