"""Exact and near-duplicate detection: document hashes, MinHash signatures, an LSH index.

Shingles are character n-grams of the document reduced to letters, digits and CJK characters
(lower-cased), so a copy that differs only in punctuation or spacing has the same shingles.
Two signature backends give a ``[num_perm]`` uint32 signature per document:

* ``numpy`` (default): shingles hashed with a polynomial + splitmix64 finaliser
  (:func:`filters.ngram_hashes`), permuted by ``num_perm`` multiply-add-shift hashes
  ``(a * x + b) mod 2**64 >> 32`` (a odd), minimum per permutation; whole document vectorised.
* ``datasketch``: ``datasketch.MinHash`` over the UTF-8 shingles (sha1 + Mersenne-prime
  permutations), for comparison. BENCHMARKS-clean.md holds the measurement that chose numpy.

:class:`LSHIndex` splits signatures into ``bands`` of ``rows`` (chosen for the threshold, see
:func:`optimal_bands`), keys each band by a 64-bit hash of its values, and verifies each
candidate by the estimated Jaccard similarity (share of equal signature values), so the output
does not depend on band collisions alone. It holds the signatures of kept documents only.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from megagpt.curation.filters import codepoints, ngram_hashes

# Everything that is not a letter or digit (CJK ideographs are letters): punctuation, symbols,
# whitespace. \W with re.UNICODE keeps the underscore; drop it too.
_NON_WORD = re.compile(r"[\W_]+")


def normalized_key(text: str) -> str:
    """Text that exact duplicates share: letters and digits only, lower-cased."""
    return _NON_WORD.sub("", text).lower()


def exact_hash(text: str) -> int:
    """64-bit hash of :func:`normalized_key` (blake2b; collisions ~ n**2 / 2**65)."""
    digest = hashlib.blake2b(normalized_key(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


class MinHasher:
    """Signatures of documents: ``signature(text) -> uint32[num_perm]``.

    Args:
        num_perm: signature length.
        shingle_chars: n of the character n-gram shingles.
        seed: permutation seed.
        backend: ``numpy`` or ``datasketch``.
    """

    _BLOCK = 2048  # shingles per block: bounds the [block, num_perm] uint64 temporary to 2 MiB

    def __init__(
        self, num_perm: int = 128, shingle_chars: int = 5, seed: int = 1, backend: str = "numpy"
    ) -> None:
        self.num_perm = num_perm
        self.n = shingle_chars
        self.seed = seed
        self.backend = backend
        self.a, self.b = _permutations(num_perm, seed)
        if backend == "datasketch":
            try:
                from datasketch import MinHash
            except ImportError as exc:
                from megagpt.data.errors import DataError

                raise DataError(
                    'dedup.backend datasketch needs datasketch: pip install -e ".[data]"'
                ) from exc
            self._ds = MinHash(num_perm=num_perm, seed=seed)  # permutations built once

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature of ``text``'s shingles, uint32 ``[num_perm]``."""
        key = normalized_key(text)
        if self.backend == "datasketch":
            return self._datasketch(key)
        cp = codepoints(key)
        shingles = ngram_hashes(cp, min(self.n, max(len(cp), 1)))
        if len(shingles) == 0:  # empty text: a fixed signature, equal only to other empties
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        shingles = np.unique(shingles)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), self._BLOCK):
            block = shingles[start : start + self._BLOCK, None]  # [block, 1]
            sig = np.minimum(sig, (block * self.a + self.b).min(axis=0))  # [num_perm]
        return (sig >> np.uint64(32)).astype(np.uint32)

    def _datasketch(self, key: str) -> np.ndarray:
        from datasketch import MinHash

        n = min(self.n, max(len(key), 1))
        shingles = {key[i : i + n].encode("utf-8") for i in range(len(key) - n + 1)}
        m = MinHash(
            num_perm=self.num_perm,
            seed=self.seed,
            permutations=self._ds.permutations,
            scheme=self._ds.scheme,
        )  # reuse the permutations: built once
        m.update_batch(list(shingles))
        return m.hashvalues.astype(np.uint32)


def optimal_bands(
    threshold: float, num_perm: int, false_negative_weight: float = 0.9
) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the weighted areas of
    false positives (below ``threshold``) and false negatives (above) of the candidate
    probability ``1 - (1 - s**rows)**bands``.

    Misses weigh 0.9 and false candidates 0.1, not datasketch's 0.5/0.5: every candidate is
    verified by its signature similarity, so a false candidate costs one comparison while a
    miss is a duplicate left in the data. At 0.8 and 128 permutations this gives 14 x 9,
    candidate probability 0.87 at s = 0.8 (equal weights: 9 x 13, 0.40) and 0.03 at s = 0.5.
    """
    s = np.linspace(0.0, 1.0, 1001)
    best, best_cost = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - s**rows) ** bands
            fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
            cost = (1.0 - false_negative_weight) * fp + false_negative_weight * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


class LSHIndex:
    """Signatures of kept documents, banded for candidate lookup.

    Per kept document it stores its signature (``4 * num_perm`` bytes, a growable array) and
    one entry per band in a dict keyed by the band hash: that is the only per-document state of
    ``megagpt clean`` (see :meth:`bytes_per_document`).
    """

    def __init__(self, num_perm: int, threshold: float, seed: int = 1) -> None:
        self.threshold = threshold
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        rng = np.random.default_rng(seed + 1)
        # [bands, rows] odd multipliers: band key = sum(value * multiplier) mod 2**64
        self._mult = rng.integers(
            1, 2**63, size=(self.bands, self.rows), dtype=np.uint64
        ) * np.uint64(2) + np.uint64(1)
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._sigs = np.empty((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def _keys(self, sig: np.ndarray) -> list[int]:
        used = sig[: self.bands * self.rows].reshape(self.bands, self.rows)  # [bands, rows]
        return (used.astype(np.uint64) * self._mult).sum(axis=1).tolist()

    def query(self, sig: np.ndarray) -> tuple[int, float] | None:
        """The kept document most similar to ``sig`` at or above the threshold (the earliest
        on ties), as ``(index, estimated Jaccard)``; None if there is none."""
        candidates: set[int] = set()
        for table, key in zip(self._tables, self._keys(sig)):
            hit = table.get(key)
            if hit is None:
                continue
            if isinstance(hit, int):
                candidates.add(hit)
            else:
                candidates.update(hit)
        if not candidates:
            return None
        idx = np.fromiter(sorted(candidates), dtype=np.int64, count=len(candidates))
        sims = (self._sigs[idx] == sig).mean(axis=1)  # [candidates]
        best = int(np.argmax(sims))  # first maximum: the earliest kept document
        if sims[best] < self.threshold:
            return None
        return int(idx[best]), float(sims[best])

    def add(self, sig: np.ndarray) -> int:
        """Index ``sig`` as the next kept document; returns its index."""
        if self.size == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        i = self.size
        self._sigs[i] = sig
        self.size += 1
        for table, key in zip(self._tables, self._keys(sig)):
            hit = table.get(key)
            if hit is None:
                table[key] = i
            elif isinstance(hit, int):
                table[key] = [hit, i]
            else:
                hit.append(i)
        return i

    def bytes_per_document(self) -> float:
        """Measured bytes held per indexed document: signature row plus band-table entries
        (dict slots and key/value int objects), from ``sys.getsizeof``."""
        import sys

        if self.size == 0:
            return 0.0
        total = self._sigs.itemsize * self._sigs.shape[1] * self.size
        for table in self._tables:
            total += sys.getsizeof(table)
            for key, value in table.items():
                total += sys.getsizeof(key)
                total += sys.getsizeof(value) if not isinstance(value, int) or value > 256 else 0
        return total / self.size
