"""GPT training samples: documents packed into ``seq_length + 1`` token windows.

For one indexed dataset and one split (a contiguous range of its documents) the sample index
is three arrays, built once and cached (see :mod:`megagpt.data.cache`):

* ``doc_idx``: the documents in reading order -- one independent shuffle of the range per
  epoch, as many epochs as ``num_samples`` needs;
* ``sample_idx`` [S + 1, 2]: where sample ``j`` starts in that stream, as (position in
  ``doc_idx``, token offset). Sample ``j`` is the ``seq_length + 1`` tokens starting at
  ``j * seq_length``: consecutive samples share one token, so every token is a target exactly
  once. Samples cross document boundaries; the EOD written by ``--append-eod`` separates them;
* ``shuffle_idx`` [S]: the order samples are served in. The samples of the last epoch are
  shuffled separately from the earlier ones, so the first ``num_samples`` served always cover
  every full epoch and then a random part of the last one -- every document is seen at least
  ``epochs - 1`` times, never a random subset of it more often than others.

The stream of one epoch holds ``T`` tokens (the sum of the split's document lengths), and
``S = (epochs * T - 1) // seq_length >= num_samples``; ``len(dataset) == S``.

Everything is vectorised numpy (``searchsorted`` over token prefix sums), so no compiled helper
is needed; megatron-core builds the same index with a C++ loop.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from megagpt.data.cache import MappedArraysPickleMixin, cached_arrays
from megagpt.data.errors import DataError
from megagpt.data.indexed import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> normalised weights for (train, valid, test).

    Missing trailing parts are 0 (``"98,2"`` has no test split). Separators ``,`` or ``/``.

    Raises:
        DataError: not numbers, negative, more than three parts, or all zero.
    """
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"split {split!r}: expected up to three numbers like '969,30,1'") from None
    if len(values) > 3 or any(v < 0 for v in values) or not sum(values) > 0:
        raise DataError(
            f"split {split!r}: expected up to three non-negative numbers with a positive sum, "
            "like '969,30,1'"
        )
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_document_ranges(num_documents: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` document ranges for the split ``weights``.

    Boundaries are rounded cumulative fractions, so the ranges always tile the dataset.
    """
    bounds = [0]
    cumulative = 0.0
    for w in weights:
        cumulative += w
        bounds.append(round(cumulative * num_documents))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(len(weights))]


def dataset_fingerprint(ds: IndexedDataset) -> str:
    """Hash of the document structure (what a sample index depends on), not of the path.

    The same data copied elsewhere reuses its cache; a regenerated dataset gets a new index.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(ds.sequence_lengths.tobytes())
    h.update(np.asarray(ds.document_indices).tobytes())
    return h.hexdigest()


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest number of epochs whose tokens hold ``num_samples`` samples."""
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


class IndexMemoryError(DataError):
    """The sample index asked for cannot be built in the memory this machine has free.
    ``whole_epoch``: the dataset's one pass already is the size (fewer samples would not help)."""

    def __init__(self, message: str, whole_epoch: bool = False):
        super().__init__(message)
        self.whole_epoch = whole_epoch


# What build_sample_index holds at its peak, at least: per sample the int64 starts, their
# documents, the [n, 2] index and the shuffle (50-85 bytes measured); per document of the
# epoch-repeated stream its id, length and start.
_INDEX_BYTES_PER_SAMPLE = 48
_INDEX_BYTES_PER_STREAM_DOC = 20


def available_memory() -> int | None:
    """Bytes of memory the kernel can give now (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_index_memory(samples: int, stream_docs: int, num_samples: int, epochs: int) -> None:
    need = samples * _INDEX_BYTES_PER_SAMPLE + stream_docs * _INDEX_BYTES_PER_STREAM_DOC
    free = available_memory()
    if free is not None and need > free:
        raise IndexMemoryError(
            f"the sample index of {num_samples:,} samples ({samples:,} in {epochs:,} whole "
            f"epoch{'s' if epochs > 1 else ''}, {stream_docs:,} documents) needs at least "
            f"{need / 2**30:.1f} GiB of memory to build and {free / 2**30:.1f} GiB is available",
            whole_epoch=epochs == 1 and samples > 2 * num_samples,
        )


def build_sample_index(
    lengths: np.ndarray,
    doc_start: int,
    seq_length: int,
    num_samples: int,
    seed: int | np.random.SeedSequence,
) -> dict[str, np.ndarray]:
    """The ``doc_idx``, ``sample_idx`` and ``shuffle_idx`` arrays described in the module doc.

    Args:
        lengths: token count of each document of the split (documents ``doc_start ...``).
        doc_start: dataset index of the split's first document (``doc_idx`` holds dataset
            indices).
        seq_length: tokens per sample, minus one.
        num_samples: samples wanted (``len`` will be at least this).
        seed: shuffling seed.
    """
    tokens_per_epoch = int(lengths.sum(dtype=np.int64))
    if tokens_per_epoch < seq_length + 1:
        raise ValueError("split holds fewer tokens than one sample; validate before building")
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    n_docs = len(lengths)
    # Before any allocation: an index larger than the free memory is an error, not a kill.
    samples = (epochs * tokens_per_epoch - 1) // seq_length
    _check_index_memory(samples, epochs * n_docs, num_samples, epochs)
    rng = np.random.default_rng(seed)
    index_dtype = np.int32 if doc_start + n_docs < 2**31 else np.int64
    doc_idx = np.empty(epochs * n_docs, dtype=index_dtype)
    for e in range(epochs):
        doc_idx[e * n_docs : (e + 1) * n_docs] = rng.permutation(n_docs) + doc_start
    stream_lengths = lengths[doc_idx - doc_start].astype(np.int64)
    starts_of_docs = np.zeros(len(doc_idx) + 1, dtype=np.int64)
    np.cumsum(stream_lengths, out=starts_of_docs[1:])
    total_samples = (int(starts_of_docs[-1]) - 1) // seq_length
    sample_starts = np.arange(total_samples + 1, dtype=np.int64) * seq_length
    # Document holding each start: the last doc whose first token is at or before it. Empty
    # documents share a start with their successor; side="right" skips past them.
    pos = np.searchsorted(starts_of_docs, sample_starts, side="right") - 1
    sample_idx = np.stack([pos, sample_starts - starts_of_docs[pos]], axis=1)
    if epochs == 1:
        shuffle_idx = rng.permutation(total_samples)
    else:
        first = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        shuffle_idx = np.concatenate(
            [rng.permutation(first), first + rng.permutation(total_samples - first)]
        )
    return {
        "doc_idx": doc_idx,
        "sample_idx": sample_idx,
        "shuffle_idx": shuffle_idx.astype(np.int64),
    }


class GPTDataset(MappedArraysPickleMixin):
    """Fixed-length token samples from one split of one indexed dataset.

    ``ds[i]`` is ``{"tokens": int64 array [seq_length + 1]}``; inputs are ``tokens[:-1]``,
    labels ``tokens[1:]``. Build with :func:`megagpt.data.build_gpt_datasets`.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        split_name: str,
        doc_range: tuple[int, int],
        seq_length: int,
        num_samples: int,
        seed: int | list[int],
        cache_dir: str | None = None,
        node_local_cache: bool = False,
    ) -> None:
        self.indexed = indexed
        self.split_name = split_name
        self.doc_range = doc_range
        self.seq_length = seq_length
        self.num_samples = num_samples
        start, end = doc_range
        lengths = np.asarray(indexed.sequence_lengths[start:end])
        check_split_size(indexed.prefix, split_name, doc_range, lengths, seq_length, num_samples)
        description = {
            "dataset": dataset_fingerprint(indexed),
            "split": split_name,
            "documents": [int(start), int(end)],
            "seq_length": int(seq_length),
            "num_samples": int(num_samples),
            "seed": seed if isinstance(seed, int) else list(seed),
        }

        def build() -> dict[str, np.ndarray]:
            try:
                return build_sample_index(
                    lengths, start, seq_length, num_samples, np.random.SeedSequence(seed)
                )
            except IndexMemoryError as e:
                raise IndexMemoryError(
                    f"{indexed.prefix} ({split_name} split): {e}", e.whole_epoch
                ) from None

        arrays = cached_arrays(
            cache_dir,
            "gpt-index",
            description,
            ("doc_idx", "sample_idx", "shuffle_idx"),
            build,
            node_local=node_local_cache,
            info={"prefix": os.path.abspath(indexed.prefix)},
        )
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return {"tokens": self.sample_tokens(int(self.shuffle_idx[i]))}

    def sample_tokens(self, j: int) -> np.ndarray:
        """Tokens of sample ``j`` in unshuffled stream order."""
        d0, o0 = (int(x) for x in self.sample_idx[j])
        d1, o1 = (int(x) for x in self.sample_idx[j + 1])
        if d0 == d1:
            return self.indexed.get(int(self.doc_idx[d0]), o0, o1 - o0 + 1).astype(np.int64)
        pieces = [self.indexed.get(int(self.doc_idx[d0]), o0)]
        pieces += [self.indexed.get(int(self.doc_idx[d])) for d in range(d0 + 1, d1)]
        pieces.append(self.indexed.get(int(self.doc_idx[d1]), 0, o1 + 1))
        return np.concatenate(pieces).astype(np.int64)


def check_split_size(
    prefix: str,
    split_name: str,
    doc_range: tuple[int, int],
    lengths: np.ndarray,
    seq_length: int,
    num_samples: int,
) -> None:
    """Raise a :class:`DataError` naming the split when it cannot supply one sample per pass.

    A split with fewer than ``seq_length + 1`` tokens would need many epochs per sample (or
    infinitely many when empty); that is almost always a misconfigured split or sequence length.
    """
    start, end = doc_range
    tokens = int(lengths.sum(dtype=np.int64))
    if tokens < seq_length + 1:
        raise DataError(
            f"{split_name} split of {prefix} is too small: documents [{start}, {end}) "
            f"({end - start} documents, {tokens} tokens) cannot fill one sample of "
            f"{seq_length + 1} tokens, and {num_samples} samples were requested; give the "
            "split a larger share (--split), use more data, or a shorter sequence length"
        )
