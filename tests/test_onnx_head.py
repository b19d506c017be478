"""The int8 ONNX export of a fine-tuned head against its torch fp32 weights (no Ray needed).

The head is MiniLM with a freshly initialised 4-way classification layer, saved as a trained
head directory is (`save_pretrained` + tokenizer): export, load back, and score the same
AG News dev rows with both engines of the classifier backend.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import AGNEWS_LABELS, DATASETS

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_head(tmp_path_factory):
    from raycls.train import heads
    from raycls.train.onnx_export import ONNX_FILE, export_onnx
    from raycls.train.spec import ModelSpec

    target = tmp_path_factory.mktemp("onnx_head")
    net, tokenizer = heads.build_model(heads.resolve_base_model("minilm"), ModelSpec(), AGNEWS_LABELS, seed=0)
    net.classifier.weight.data *= 10  # a fresh head is near-uniform; scaled, its labels are decided (as a trained head's)
    net.save_pretrained(target)
    tokenizer.save_pretrained(target)
    assert export_onnx(target)["file"] == ONNX_FILE and (target / ONNX_FILE).is_file()
    return target


@pytest.mark.timeout(600)
def test_onnx_int8_and_torch_fp32_give_the_same_labels(onnx_head, monkeypatch):
    from raycls.backends.head_engines import ENV_ENGINE, load_scorer

    texts = pq.read_table(DATASETS / "agnews_dev.parquet").column("text").to_pylist()[:32]
    fast = load_scorer(str(onnx_head), max_length=64, threads=1, use_gpu=False)
    monkeypatch.setenv(ENV_ENGINE, "torch")
    slow = load_scorer(str(onnx_head), max_length=64, threads=1, use_gpu=False)
    assert (fast.engine, slow.engine) == ("onnxruntime-int8", "torch") and fast.labels == slow.labels == AGNEWS_LABELS
    p_fast, len_fast = fast(texts)
    p_slow, len_slow = slow(texts)
    p_fast, p_slow = np.array(p_fast), np.array(p_slow)
    assert len_fast == len_slow
    np.testing.assert_allclose(p_fast.sum(axis=1), 1.0, rtol=1e-6)
    worst = np.abs(p_fast - p_slow).max()
    assert worst < 0.1
    margin = np.sort(p_slow, axis=1)[:, -1] - np.sort(p_slow, axis=1)[:, -2]
    clear = margin > 2 * worst  # only a row whose margin is within 2x the largest difference can flip
    assert clear.sum() > 0 and (p_fast.argmax(1)[clear] == p_slow.argmax(1)[clear]).all()


def test_export_rewrites_the_digest_over_every_weight_file(onnx_head):
    import hashlib

    h = hashlib.sha256()
    for name in sorted(p.name for p in onnx_head.iterdir() if p.suffix in (".onnx", ".safetensors")):
        h.update(name.encode() + b"\0" + (onnx_head / name).read_bytes())
    assert json.loads((onnx_head / "head_digest.json").read_text()) == {"weights_sha256": h.hexdigest()}


@pytest.mark.timeout(600)
def test_an_onnx_head_scores_a_row_the_same_whatever_batch_it_comes_in(onnx_head):
    """Int8 activations are scaled per input tensor: a row must not be scored beside others, or
    a cache hit, a resumed row and a fresh one would disagree."""
    from raycls.backends.head_engines import load_scorer

    texts = pq.read_table(DATASETS / "agnews_dev.parquet").column("text").to_pylist()[:24]
    scorer = load_scorer(str(onnx_head), max_length=64, threads=1, use_gpu=False)
    together, _ = scorer(texts)
    reversed_order, _ = scorer(texts[::-1])
    alone = [scorer([text])[0][0] for text in texts[:6]]
    assert reversed_order[::-1] == together
    assert alone == together[:6]


def test_the_quantizers_preprocessing_advice_is_dropped_and_other_warnings_kept(caplog):
    import logging

    from raycls.train.onnx_export import _without_preprocess_advice

    with caplog.at_level(logging.WARNING), _without_preprocess_advice():
        logging.warning("Please consider to run pre-processing before quantization. Refer to example: ...")
        logging.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
