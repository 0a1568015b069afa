"""Exact and near-duplicate detection: signatures estimate Jaccard, LSH finds planted copies."""

from __future__ import annotations

import random

import numpy as np
import pytest

from megagpt.curation.dedup import LSHIndex, MinHasher, exact_hash, normalized_key, optimal_bands
from megagpt.curation.synthetic import EDITS, near_copy


def _jaccard(a: str, b: str, n: int = 5) -> float:
    a, b = normalized_key(a), normalized_key(b)
    sa = {a[i : i + n] for i in range(len(a) - n + 1)}
    sb = {b[i : i + n] for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def test_exact_hash_ignores_punctuation_space_and_case():
    assert exact_hash("长城，是 中国 的。ABC") == exact_hash("长城是中国的abc")
    assert exact_hash("长城是中国的") != exact_hash("长城是中国")


@pytest.mark.parametrize("backend", ["numpy", "datasketch"])
def test_signature_estimates_jaccard(backend, wiki_docs):
    if backend == "datasketch":  # the numpy backend (the default) needs no optional package
        pytest.importorskip("datasketch")
    h = MinHasher(num_perm=256, backend=backend)
    rng = random.Random(1)
    errors = []
    for i, text in enumerate(wiki_docs[:20]):
        copy = near_copy(text, rng, EDITS[i % len(EDITS)], wiki_docs[i + 1])
        est = float((h.signature(text) == h.signature(copy)).mean())
        errors.append(abs(est - _jaccard(text, copy)))
        assert (h.signature(text) == h.signature(wiki_docs[i + 40])).mean() < 0.1
    assert np.mean(errors) < 0.04  # std of the estimate at 256 permutations is <= 0.031
    assert np.array_equal(
        h.signature(wiki_docs[0]), MinHasher(256, backend=backend).signature(wiki_docs[0])
    )  # same seed, same signature


def test_optimal_bands_favour_recall_at_the_threshold():
    bands, rows = optimal_bands(0.8, 128)
    assert bands * rows <= 128

    def p(s):
        return 1 - (1 - s**rows) ** bands

    assert p(0.8) > 0.8 and p(0.9) > 0.99 and p(0.5) < 0.05
    b, r = optimal_bands(0.8, 128, false_negative_weight=0.5)  # datasketch's default weights
    assert (b, r) == (9, 13) and 1 - (1 - 0.8**r) ** b < 0.5


def test_lsh_precision_recall_on_planted_copies(wiki_docs):
    """Planted copies with small edits are found; distinct paragraphs are not flagged."""
    h, rng = MinHasher(), random.Random(0)
    originals = wiki_docs[:60]
    index = LSHIndex(128, 0.8)
    for text in originals:
        assert index.query(h.signature(text)) is None  # distinct documents: no false hit
        index.add(h.signature(text))
    found = planted = 0
    for i, text in enumerate(originals[:40]):
        copy = near_copy(text, rng, EDITS[i % len(EDITS)], originals[(i + 7) % 60])
        if _jaccard(text, copy) < 0.85:  # the planted edit was not small for this paragraph
            continue
        planted += 1
        hit = index.query(h.signature(copy))
        found += hit is not None and hit[0] == i
    assert planted >= 30 and found / planted >= 0.95
    assert index.bytes_per_document() > 4 * 128
