"""Files of the kind data lakes hold: mixed types, duplicate ids, encodings, compression, odd gold.

Each test is one behaviour, through the real reading path (`raycls.inputs.datasource`: resolve, check, the
id pass, the Ray datasource and the prepare step). The last ones run the whole job through
the CLI against the fault-injection server: rows out = rows in, and no traceback.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.config import InputSpec
from raycls.errors import InputError
from raycls.inputs.datasource import InputDatasource, check_input, read_rows, resolve_input
from raycls.quality.metrics import format_table, scores_from_counts, split_gold
from raycls.job.pipeline import prepare_batch
from tests.conftest import UNPACED


def jsonl(path, rows, encoding="utf-8"):
    path.write_bytes("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows).encode(encoding))
    return path


def checked(**spec) -> InputSpec:
    """The spec, after the checks a job makes before it starts (columns, the id pass)."""
    spec = InputSpec(**spec)
    files = resolve_input(spec)
    check_input(spec, files)
    InputDatasource(spec, files)
    return spec


def prepared(spec: InputSpec) -> list[dict]:
    """Rows as the backend would get them: read on Ray, then the prepare step; sorted by id."""
    ds = read_rows(spec).map_batches(prepare_batch, fn_kwargs={"text_template": spec.text}, batch_format="pyarrow")
    return sorted(ds.take_all(), key=lambda r: r[schema.ID])


# -- types --------------------------------------------------------------------------------


@pytest.mark.ray
def test_a_number_in_the_text_column_is_read_as_its_text(ray_local, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a string"}, {"text": 42}, {"text": 2.5}, {"text": True}])
    rows = prepared(InputSpec(path=str(path)))
    assert [r[schema.TEXT] for r in rows] == ["a string", "42", "2.5", "true"]
    assert all(r[schema.ERROR] is None for r in rows)


@pytest.mark.ray
def test_a_list_or_object_in_the_text_column_is_rendered_as_json(ray_local, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": ["a", "b"]}, {"text": {"k": "中文"}}, {"text": "plain"}])
    rows = prepared(InputSpec(path=str(path)))
    assert [r[schema.TEXT] for r in rows] == ['["a", "b"]', '{"k": "中文"}', "plain"]


@pytest.mark.ray
def test_integer_and_string_ids_are_both_ids(ray_local, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": "a"}, {"id": "x2", "text": "b"}, {"id": 3.0, "text": "c"}])
    rows = prepared(checked(path=str(path), id_column="id"))
    assert [r[schema.ID] for r in rows] == ["1", "3", "x2"]


@pytest.mark.ray
def test_ids_are_the_same_strings_in_every_format(ray_local, tmp_path):
    table = pa.table({"key": [7, 8], "text": ["a", "b"]})
    pq.write_table(table, tmp_path / "a.parquet")
    pacsv.write_csv(table, tmp_path / "b.csv")
    jsonl(tmp_path / "c.jsonl", table.to_pylist())
    got = {fmt: [r[schema.ID] for r in prepared(InputSpec(path=str(tmp_path / f"{name}.{fmt}"), id_column="key"))]
           for name, fmt in (("a", "parquet"), ("b", "csv"), ("c", "jsonl"))}
    assert got == {"parquet": ["7", "8"], "csv": ["7", "8"], "jsonl": ["7", "8"]}


def test_an_object_as_an_id_names_file_line_and_column(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"id": {"deep": 1}, "text": "y"}])
    with pytest.raises(InputError) as err:
        checked(path=str(path), id_column="id")
    assert err.value.line == 2 and "d.jsonl:2: column 'id': an id must be a string or a number" in str(err.value)


@pytest.mark.ray
def test_csv_and_parquet_text_columns_of_numbers_are_read_as_text(ray_local, tmp_path):
    pacsv.write_csv(pa.table({"text": [1, 2]}), tmp_path / "n.csv")
    pq.write_table(pa.table({"text": [3, 4]}), tmp_path / "n.parquet")
    assert [r[schema.TEXT] for r in prepared(InputSpec(path=str(tmp_path / "n.csv")))] == ["1", "2"]
    assert [r[schema.TEXT] for r in prepared(InputSpec(path=str(tmp_path / "n.parquet")))] == ["3", "4"]


@pytest.mark.ray
def test_an_extra_column_whose_lines_disagree_is_read_as_text(ray_local, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a", "extra": 1}, {"text": "b", "extra": "two"}, {"text": "c", "extra": [3]}])
    rows = prepared(InputSpec(path=str(path)))
    assert [r["extra"] for r in rows] == ["1", "two", "[3]"]


@pytest.mark.ray
def test_a_file_without_the_text_column_flags_its_rows_empty_text(ray_local, tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "here"}])
    jsonl(tmp_path / "b.jsonl", [{"body": "elsewhere"}])
    (tmp_path / "c.jsonl").write_text("")
    rows = prepared(InputSpec(path=str(tmp_path)))
    assert [(r[schema.ID], r[schema.ERROR]) for r in rows] == [("a.jsonl:0", None), ("b.jsonl:0", schema.EMPTY_TEXT)]


@pytest.mark.ray
def test_a_line_separator_inside_a_json_string_does_not_split_the_line(ray_local, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one\u2028two\x85three"}\n', encoding="utf-8")
    assert [r[schema.TEXT] for r in prepared(InputSpec(path=str(path)))] == ["one\u2028two\x85three"]


# -- duplicate ids --------------------------------------------------------------------------

DUPLICATED = [{"id": f"k{i % 10}", "text": f"row {i}"} for i in range(15)]  # 15 rows, k0..k4 twice


def test_duplicate_ids_are_refused_with_a_count_and_examples(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", DUPLICATED)
    with pytest.raises(InputError) as err:
        checked(path=str(path), id_column="id")
    message = str(err.value)
    assert "5 id(s) occur more than once (5 repeated row(s)), e.g. 'k0' (2 times), 'k1' (2 times), 'k2' (2 times)" in message
    assert "input.duplicate_ids" in message


def test_duplicate_ids_across_files_are_found(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "x"}])
    jsonl(tmp_path / "b.jsonl", [{"id": "1", "text": "y"}])
    with pytest.raises(InputError, match="1 id\\(s\\) occur more than once"):
        checked(path=str(tmp_path), id_column="id")


@pytest.mark.ray
def test_suffix_makes_later_duplicates_unique_in_file_order(ray_local, tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"id": "k", "text": "first"}, {"id": "k#2", "text": "taken"}, {"id": "k", "text": "second"}])
    jsonl(tmp_path / "b.jsonl", [{"id": "k", "text": "third"}])
    rows = prepared(checked(path=str(tmp_path), id_column="id", duplicate_ids="suffix"))
    assert {r[schema.ID]: r["text"] for r in rows} == {"k": "first", "k#2": "taken", "k#3": "second", "k#4": "third"}
    assert all(r[schema.ERROR] is None for r in rows)


@pytest.mark.ray
def test_keep_first_flags_later_duplicates(ray_local, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", DUPLICATED)
    rows = prepared(checked(path=str(path), id_column="id", duplicate_ids="keep_first"))
    assert len(rows) == 15 and len({r[schema.ID] for r in rows}) == 15
    flagged = {r[schema.ID] for r in rows if r[schema.ERROR] == schema.DUPLICATE_ID}
    assert flagged == {f"k{i}#2" for i in range(5)}


@pytest.mark.ray
def test_a_rerun_derives_the_same_suffixed_ids(ray_local, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", DUPLICATED)
    spec = checked(path=str(path), id_column="id", duplicate_ids="suffix")
    first = [(r[schema.ID], r["text"]) for r in prepared(spec)]
    assert first == [(r[schema.ID], r["text"]) for r in prepared(spec)]


@pytest.mark.ray
def test_derived_ids_never_collide(ray_local, tmp_path):
    (tmp_path / "x.jsonl:1").mkdir()  # a folder named like a derived id, and files of one name at two depths
    jsonl(tmp_path / "x.jsonl:1" / "x.jsonl", [{"text": "p"}] * 3)
    jsonl(tmp_path / "x.jsonl", [{"text": "q"}] * 3)
    rows = prepared(InputSpec(path=str(tmp_path)))
    assert len({r[schema.ID] for r in rows}) == 6 and "x.jsonl:1" in {r[schema.ID] for r in rows}


def test_a_null_id_is_refused_before_the_read(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"text": "no id"}])
    with pytest.raises(InputError, match="is null or empty on 1 row"):
        checked(path=str(path), id_column="id")


# -- encodings ------------------------------------------------------------------------------


def test_an_invalid_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError) as err:
        checked(path=str(path))
    assert err.value.line == 2 and "not valid utf-8" in str(err.value) and "input.encoding" in str(err.value)


@pytest.mark.ray
@pytest.mark.parametrize("encoding,text", [("latin-1", "café"), ("gb18030", "酒店很干净")])
def test_input_encoding_decodes(ray_local, tmp_path, encoding, text):
    path = jsonl(tmp_path / "d.jsonl", [{"text": text}], encoding=encoding)
    assert [r[schema.TEXT] for r in prepared(checked(path=str(path), encoding=encoding))] == [text]


@pytest.mark.ray
def test_encoding_errors_replace_flags_the_row_and_keeps_it(ray_local, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    rows = prepared(checked(path=str(path), encoding_errors="replace"))
    assert [(r[schema.TEXT], r[schema.ERROR]) for r in rows] == [("fine", None), ("caf\ufffd", schema.DECODE_ERROR)]


@pytest.mark.ray
def test_a_lone_surrogate_escape_is_an_error_or_a_flagged_row(ray_local, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "half \\ud83d"}\n')
    with pytest.raises(InputError, match="lone UTF-16 surrogate") as err:
        checked(path=str(path))
    assert err.value.line == 2
    rows = prepared(checked(path=str(path), encoding_errors="replace"))
    assert [r[schema.ERROR] for r in rows] == [None, schema.DECODE_ERROR] and rows[1][schema.TEXT] == "half \ufffd"


@pytest.mark.ray
def test_a_utf8_bom_is_accepted(ray_local, tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufefftext,label\n\"two\nlines\",a\n".encode())
    assert [r[schema.TEXT] for r in prepared(InputSpec(path=str(path)))] == ["two\nlines"]


def test_an_unknown_encoding_is_a_spec_error():
    from raycls.config import parse_spec
    from raycls.errors import SpecError

    with pytest.raises(SpecError, match="input.encoding: .*unknown text encoding 'klingon'"):
        parse_spec({"input": {"path": "x", "encoding": "klingon"}, "labels": ["a", "b"], "output": {"path": "o"}})


# -- compression ----------------------------------------------------------------------------

COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.mark.ray
@pytest.mark.parametrize("suffix", ["gz", "bz2", "xz", "zst"])
def test_compressed_jsonl_reads_with_ids_from_the_path_as_written(ray_local, tmp_path, suffix):
    raw = "".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(3)).encode()
    if suffix == "zst":
        import zstandard

        packed = zstandard.ZstdCompressor().compress(raw)
    else:
        packed = COMPRESS[suffix](raw)
    (tmp_path / f"part-0.jsonl.{suffix}").write_bytes(packed)
    rows = prepared(InputSpec(path=str(tmp_path)))
    assert [(r[schema.ID], r[schema.TEXT]) for r in rows] == [(f"part-0.jsonl.{suffix}:{i}", f"t{i}") for i in range(3)]


@pytest.mark.ray
def test_compressed_csv_reads(ray_local, tmp_path):
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b"text\nhello\n"))
    assert [r[schema.TEXT] for r in prepared(InputSpec(path=str(tmp_path / "d.csv.gz")))] == ["hello"]


@pytest.mark.ray
@pytest.mark.parametrize("codec", ["zstd", "brotli", "gzip", "none"])
def test_parquet_with_any_codec_reads(ray_local, tmp_path, codec):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "d.parquet", compression=codec)
    assert [r[schema.TEXT] for r in prepared(InputSpec(path=str(tmp_path / "d.parquet")))] == ["a", "b"]


def test_a_corrupt_gzip_file_is_an_input_error(tmp_path):
    (tmp_path / "d.jsonl.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match="d.jsonl.gz: not a valid gzip file"):
        checked(path=str(tmp_path / "d.jsonl.gz"))


# -- bounded messages -----------------------------------------------------------------------


def test_a_malformed_line_with_a_huge_value_gives_a_short_message(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "' + "x" * 300_000 + '", oops}\n')
    with pytest.raises(InputError) as err:
        checked(path=str(path))
    assert len(str(err.value)) < 700 and "d.jsonl:1" in str(err.value)


def test_a_broken_csv_row_is_quoted_only_in_part(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "y" * 200_000 + ",a,extra\n")
    with pytest.raises(InputError) as err:
        checked(path=str(path))
    assert len(str(err.value)) < 700 and "not a valid csv file" in str(err.value)


def test_duplicate_id_examples_are_excerpts(tmp_path):
    long_id = "z" * 10_000
    path = jsonl(tmp_path / "d.jsonl", [{"id": long_id, "text": "a"}, {"id": long_id, "text": "b"}])
    with pytest.raises(InputError) as err:
        checked(path=str(path), id_column="id")
    assert len(str(err.value)) < 700 and "(10000 chars)" in str(err.value)


# -- gold labels ----------------------------------------------------------------------------


def test_gold_outside_the_label_set_and_null_gold_are_counted_and_not_scored():
    pairs = [("a", "a", 5), ("b", "a", 3), ("Tech", "a", 2), (None, "b", 4), ("", "b", 1)]
    scored, gold = split_gold(pairs, ["a", "b"])
    assert gold["missing"] == 5 and gold["outside_labels"] == 2 and gold["outside_examples"] == {"Tech": 2}
    assert gold["scored_rows"] == 8 and "left out" in gold["treatment"]
    scores = scores_from_counts(scored, ["a", "b"])
    assert scores["accuracy"] == 5 / 8 and "Tech" not in scores["per_class"]


def test_the_summary_has_one_line_for_each_kind_of_unscored_gold():
    metrics = {"rows_written": 10, "rows_labeled": 10, "rows_failed": 0, "failed_by_reason": {}, "input_tokens": 0, "output_tokens": 0,
               "gold": {"missing": 4, "outside_labels": 2, "outside_examples": {"Tech": 2}}}
    lines = format_table(metrics).splitlines()
    assert "gold missing on 4 row(s): not scored" in lines
    assert "gold outside the label set on 2 row(s), e.g. 'Tech' (2): not scored" in lines


# -- end to end: the CLI, the API backend and the fault-injection server --------------------

LABELS = ["negative", "positive"]


def cli_job(tmp_path, base_url, rows, *extra):
    """Run `raycls.cli.main` on `rows` (JSONL rows of any types, or raw bytes) against the fake server; (rc, output dir)."""
    import yaml

    from raycls.cli import main

    data = tmp_path / "in.jsonl"
    data.write_bytes(rows) if isinstance(rows, bytes) else jsonl(data, rows)
    (tmp_path / "keys.txt").write_text("sk-fake\n")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": str(data), "gold_column": "label"}, "labels": LABELS, "output": {"path": str(tmp_path / "out")},
        "backend": {"kind": "openai", "base_url": base_url, "model": "fake-model", "api_keys": [f"file:{tmp_path / 'keys.txt'}"],
                    **UNPACED},
    }))
    return main(["--config", str(config), *extra]), tmp_path / "out"


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("raycls: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def requests_made(server) -> int:
    return sum(k.accepted for k in server.stats().keys.values())


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_job_with_a_number_and_a_huge_string_in_the_text_column(ray_local, tmp_path, fake_openai, capsys):
    server = fake_openai(labels=LABELS, oracle={"clean": "positive", "dirty": "negative"})
    rows = [{"text": "clean room", "label": "positive"}, {"text": 12345, "label": "negative"},
            {"text": "dirty " + "x" * 200_000, "label": "negative"}, {"text": "clean", "label": "positive"}]
    rc, out = cli_job(tmp_path, server.base_url, rows)
    assert rc == 0, capsys.readouterr().err[-2000:]
    written = pq.read_table(out / "data").to_pylist()
    assert len(written) == len(rows) and sorted(r["text"][:6] for r in written) == sorted(["clean ", "12345", "dirty ", "clean"])
    assert all(r[schema.LABEL] in LABELS for r in written)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_job_with_integer_and_string_ids(ray_local, tmp_path, fake_openai, capsys):
    server = fake_openai(labels=LABELS)
    rows = [{"id": 1, "text": "a", "label": "positive"}, {"id": "x2", "text": "b", "label": "negative"}, {"id": 3, "text": "c", "label": "Tech"}]
    rc, out = cli_job(tmp_path, server.base_url, rows, "--set", "input.id_column=id")
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert sorted(pq.read_table(out / "data").column(schema.ID).to_pylist()) == ["1", "3", "x2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows_written"] == 3 and metrics["gold"]["outside_labels"] == 1 and metrics["gold"]["outside_examples"] == {"Tech": 1}
    assert "gold outside the label set on 1 row(s), e.g. 'Tech' (1): not scored" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_job_with_duplicate_ids_stops_with_one_line_before_any_call(ray_local, tmp_path, fake_openai, capsys):
    server = fake_openai(labels=LABELS)
    rows = [{**r, "label": "positive"} for r in DUPLICATED]
    rc, out = cli_job(tmp_path, server.base_url, rows, "--set", "input.id_column=id")
    assert rc == 2 and "5 id(s) occur more than once" in one_error_line(capsys.readouterr().err)
    assert requests_made(server) == 0 and not (out / "data").exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_job_with_a_latin1_byte_stops_with_one_line_naming_file_and_line(ray_local, tmp_path, fake_openai, capsys):
    server = fake_openai(labels=LABELS)
    rows = b'{"text": "fine", "label": "positive"}\n{"text": "caf\xe9", "label": "negative"}\n'
    rc, out = cli_job(tmp_path, server.base_url, rows)
    assert rc == 2 and "in.jsonl:2: not valid utf-8" in one_error_line(capsys.readouterr().err)
    assert requests_made(server) == 0


@pytest.mark.ray
def test_an_error_in_a_read_task_reaches_the_driver_as_one_line(ray_local, tmp_path, monkeypatch):
    import raycls.inputs.datasource
    from raycls.errors import user_message

    monkeypatch.setattr(raycls.inputs.datasource, "PREFLIGHT_SCAN_BYTES", 0)  # as for an input too large to check up front
    jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')
    with pytest.raises(InputError) as err:
        read_rows(InputSpec(path=str(tmp_path))).take_all()
    assert user_message(err.value) == f"{tmp_path / 'b.jsonl'}:2: malformed JSON (Expecting value at column 10); expected one JSON object per line"


def test_a_column_whose_type_differs_between_files_is_named_before_the_job(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "x", "extra": 1}])
    jsonl(tmp_path / "b.jsonl", [{"text": "y", "extra": "two"}])
    with pytest.raises(InputError) as err:
        checked(path=str(tmp_path))
    assert err.value.path.endswith("b.jsonl") and "column 'extra' holds string values here but int64 in a.jsonl" in str(err.value)


def test_a_column_whose_values_widen_between_files_is_accepted(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "x", "extra": 1.5}])
    jsonl(tmp_path / "b.jsonl", [{"text": "y", "extra": 2}, {"text": "z", "extra": None}])
    spec = InputSpec(path=str(tmp_path))
    files = resolve_input(spec)
    output_type = check_input(spec, files).field("extra").type
    assert output_type == pa.float64()  # the output's type: the first file's
    blocks = [block for task in InputDatasource(spec, files).get_read_tasks(1) for block in task()]
    later = next(b for b in blocks if b.num_rows == 2).column("extra")
    assert pa.types.is_integer(later.type)  # still numbers, not read as text
    assert later.cast(output_type).to_pylist() == [2.0, None]  # and they fit the output's type
