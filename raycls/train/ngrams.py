"""Character n-gram features beside an embedding head's sentence vectors (`model.linear.char_ngrams`).

A frozen sentence encoder blurs the surface cues a topic or a sentiment often turns on (a
stock code, 不错, 差评). TF-IDF over character n-grams keeps them, needs no word segmenter for
Chinese, and errs on other rows than the encoder: on the dev files the two together took
THUCNews titles from 0.861 to 0.8915 and ChnSentiCorp from 0.890 to 0.908 (BENCHMARKS.md).

The vectorizer is scikit-learn's `TfidfVectorizer(analyzer="char", sublinear_tf=True)`, fitted
on the training rows only. Training and serving build the regression's input with the same
function, `features`: `[embedding | tf-idf]`, both L2-normalised, as one sparse matrix. The
fitted vocabulary and idf travel in the head's `linear.npz` (`ngram_vocab`, `ngram_idf`:
plain arrays, no pickle), and `from_arrays` rebuilds the same vectorizer from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VOCAB, IDF = "ngram_vocab", "ngram_idf"


def fit_vectorizer(texts: list[str], lengths: tuple[int, int], max_features: int):
    """A TF-IDF vectorizer over character n-grams of `lengths` (min, max), fitted on `texts`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char", ngram_range=tuple(lengths), sublinear_tf=True,
                           max_features=max_features, dtype=np.float32).fit(texts)


def to_arrays(vectorizer) -> dict[str, np.ndarray]:
    """The fitted vocabulary (in column order) and idf, as arrays `np.savez` stores without pickle."""
    vocab = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.__getitem__)
    return {VOCAB: np.array(vocab, dtype=str), IDF: vectorizer.idf_.astype(np.float32)}


def from_arrays(arrays: dict[str, Any], lengths: tuple[int, int]):
    """The vectorizer `to_arrays` stored: same vocabulary, same idf, same transform."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vocab = {str(gram): i for i, gram in enumerate(arrays[VOCAB].tolist())}
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=tuple(lengths), sublinear_tf=True,
                                 vocabulary=vocab, dtype=np.float32)
    vectorizer.idf_ = np.asarray(arrays[IDF], dtype=np.float64)
    return vectorizer


def features(embeddings: np.ndarray, texts: list[str] | None, vectorizer: Any | None):
    """The regression's input: the embeddings alone (no vectorizer), or `[embeddings | tf-idf]` as a CSR matrix."""
    if vectorizer is None:
        return embeddings
    import scipy.sparse as sp

    return sp.hstack([sp.csr_matrix(embeddings), vectorizer.transform(texts)], format="csr", dtype=np.float32)
