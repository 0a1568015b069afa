"""The ``PREFIX.bin`` / ``PREFIX.idx`` token format of megatron-core's ``IndexedDataset``.

Implemented from the format, so that preprocessing does not import torch. Layout of ``.idx``
(little-endian)::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version = 1
    u8        dtype code of the tokens in .bin (uint16 = 8, int32 = 4, ... see DTYPE_CODES)
    u64       S, number of sequences
    u64       D, number of entries of document_indices (documents + 1)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence byte offsets into .bin
    int64[D]  document_indices: sequence index where each document starts, then S
    int8[S]   sequence modes (multimodal datasets only; ignored here)

``.bin`` is the tokens of all sequences back to back. megagpt writes one sequence per document.

``PREFIX.vocab.json`` (megagpt's own, next to them; megatron-core ignores it) records the size of
the tokenizer the dataset was made with, the largest token id written and, since the tokenizer
fingerprints, which tokenizer it was (:class:`TokenizerRecord`)::

    {"vocab_size": 4000, "max_token_id": 3999,
     "tokenizer": {"fingerprint": "<sha256 hex>", "path": "/abs/tok/tokenizer.json",
                   "settings": "jieba-bpe, segmenter rjieba"}}

so training can check that the data was made with its tokenizer and fits its vocabulary without
reading ``.bin`` (``check_vocab``). A record without ``tokenizer`` (older datasets) gets the size
check only; datasets without a record (older ones, or from other tools) are scanned for their
largest id instead.

Writes are crash-safe: both files are written under temporary names and renamed into place at
the end, ``.idx`` last, so an interrupted run never leaves a ``PREFIX.idx`` that describes a
different ``PREFIX.bin`` (and :class:`IndexedDataset` also checks the sizes agree).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import numpy as np

from megagpt.data.errors import DataError

if TYPE_CHECKING:
    from megagpt.data.tokenizer import Tokenizer

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


# Hex digits of a fingerprint shown in messages (enough to tell tokenizers apart by eye).
FINGERPRINT_SHORT = 8


@dataclass(frozen=True)
class TokenizerRecord:
    """Which tokenizer made a dataset, as ``PREFIX.vocab.json`` records it.

    ``fingerprint`` is the tokenizer's :attr:`Tokenizer.fingerprint` (SHA-256 hex of its files'
    content and id-changing settings): the one field compared. ``path`` (where it was loaded
    from) and ``settings`` (family and settings, e.g. ``"jieba-bpe, segmenter rjieba"``) only
    make messages actionable.
    """

    fingerprint: str
    path: str = ""
    settings: str = ""

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenizerRecord:
        """The record of a loaded :class:`megagpt.data.tokenizer.Tokenizer`."""
        settings = ", ".join(x for x in (tokenizer.family, tokenizer.settings) if x)
        return cls(tokenizer.fingerprint, os.path.abspath(tokenizer.path), settings)

    def describe(self, with_path: bool = True) -> str:
        """``fingerprint 3f2a9c1e: jieba-bpe, segmenter rjieba, from /abs/tok.json``."""
        text = f"fingerprint {self.fingerprint[:FINGERPRINT_SHORT]}"
        details = [self.settings] if self.settings else []
        if with_path and self.path:
            details.append(f"from {self.path}")
        return text + (": " + ", ".join(details) if details else "")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), int32 otherwise."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def vocab_path(prefix: str) -> str:
    return prefix + ".vocab.json"


def dataset_exists(prefix: str) -> bool:
    """Whether both files of a finished dataset are present."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


class IndexedDataset:
    """Read-only, memory-mapped view of a ``PREFIX.bin``/``PREFIX.idx`` dataset.

    Attributes:
        dtype: token dtype of ``.bin``.
        sequence_lengths: int32 [num_sequences].
        sequence_pointers: int64 [num_sequences], byte offsets into ``.bin``.
        document_indices: int64 [num_documents + 1].

    ``ds[i]`` is sequence ``i`` as a numpy array of ``dtype``; ``ds.get(i, offset, length)``
    a slice of it without reading the rest.

    Raises:
        DataError: a file is missing, has a foreign header, or the sizes of ``.idx`` and
            ``.bin`` disagree (e.g. an interrupted copy).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise DataError(f"{p}: dataset file not found (was preprocessing completed?)")
        with open(ipath, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise DataError(f"{ipath}: truncated index header")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
        if magic != INDEX_MAGIC or version != INDEX_VERSION:
            raise DataError(f"{ipath}: not a megatron indexed dataset (bad magic/version)")
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: unknown token dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        need = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
        idx_size = os.path.getsize(ipath)
        if idx_size < need:
            raise DataError(
                f"{ipath}: truncated index ({idx_size} bytes, {need} expected for "
                f"{n_seq} sequences); regenerate the dataset"
            )
        mm = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(mm, np.int32, n_seq, off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(mm, np.int64, n_seq, off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(mm, np.int64, n_doc, off)
        self._idx_mmap = mm
        expected_bin = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        bin_size = os.path.getsize(bpath)
        if bin_size != expected_bin:
            raise DataError(
                f"{bpath}: size {bin_size} bytes does not match its index ({expected_bin} bytes "
                f"expected); the dataset is incomplete or mixed up, regenerate it"
            )
        # np.memmap cannot map an empty file.
        self._bin = (
            np.memmap(bpath, mode="r", dtype=self.dtype) if bin_size else np.empty(0, self.dtype)
        )

    def __getstate__(self) -> dict:
        # Pickled into DataLoader workers: send the prefix, not a copy of the mapped files.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (to its end if length is None)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sequence_lengths[i]) - offset
        return self._bin[start : start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return self.get(i % len(self))


class IndexedDatasetWriter:
    """Write a ``PREFIX.bin``/``PREFIX.idx`` pair, one sequence per document.

    Use as a context manager: on normal exit the files are published atomically
    (:meth:`finalize`), on an exception (including ``KeyboardInterrupt``) the temporary files are
    removed (:meth:`abort`) and any previous dataset at ``prefix`` is left as it was.
    """

    def __init__(
        self,
        prefix: str,
        dtype: np.dtype,
        vocab_size: int | None = None,
        tokenizer: TokenizerRecord | None = None,
    ) -> None:
        """``vocab_size``: the tokenizer's size, recorded in ``PREFIX.vocab.json`` with the
        largest id written (None: no record); ``tokenizer``: which tokenizer it was, recorded
        with them (needs ``vocab_size``)."""
        if tokenizer is not None and vocab_size is None:
            raise ValueError("a tokenizer record needs the tokenizer's vocab_size")
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.max_token_id = -1
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        directory = os.path.dirname(os.path.abspath(prefix))
        try:
            # Like `mkdir -p`: a fresh output folder is the common case, not an error.
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise DataError(f"{directory}: cannot create the output directory ({e})") from None
        tag = f".tmp.{os.getpid()}"
        self._tmp_bin = bin_path(prefix) + tag
        self._tmp_idx = idx_path(prefix) + tag
        self._tmp_vocab = vocab_path(prefix) + tag
        # Document lengths go to a scratch file, not a list: memory stays constant however many
        # documents are written (a 1 TB corpus has billions). Closed by finalize()/abort().
        self._tmp_lengths = idx_path(prefix) + tag + ".lengths"
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = open(self._tmp_lengths, "w+b")
        self.num_tokens = 0
        self._num_documents = 0
        self._closed = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ``tokens`` and per-document ``lengths``."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(np.sum(lengths, dtype=np.int64)) != len(tokens):
            raise ValueError("lengths do not add up to the number of tokens")
        self._bin.write(tokens.tobytes())
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        self._lengths.write(lengths.tobytes())
        self._num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        self.add_documents(tokens, [len(tokens)])

    def append_shard(self, shard: Shard) -> None:
        """Append the documents of a finished :class:`ShardWriter` shard, then delete its files.

        The tokens are copied file to file inside the kernel (``copy_file_range``), so merging
        costs the caller no Python work per token: this is how parallel preprocessing puts the
        workers' shards together in order.
        """
        if shard.dtype != self.dtype.str:
            raise ValueError(f"shard dtype {shard.dtype} differs from the writer's {self.dtype}")
        self._bin.flush()
        with open(shard.bin_path, "rb") as src:
            _copy_file(src, self._bin, shard.tokens * self.dtype.itemsize)
        with open(shard.lengths_path, "rb") as src:
            _copy_file(src, self._lengths, shard.documents * 4)
        self.num_tokens += shard.tokens
        self._num_documents += shard.documents
        self.max_token_id = max(self.max_token_id, shard.max_token_id)
        shard.remove()

    @property
    def num_documents(self) -> int:
        return self._num_documents

    def finalize(self) -> None:
        """Write the index and move both files into place (``.bin`` first, ``.idx`` last)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        n = self._num_documents
        self._lengths.flush()
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, _CODE_OF[self.dtype], n, n + 1))
            # Three streaming passes over the lengths file, _INDEX_BLOCK entries at a time.
            self._lengths.seek(0)
            _copy_file(self._lengths, f, 4 * n)
            self._lengths.seek(0)
            offset = 0  # byte offset of the next sequence in .bin
            for start in range(0, n, _INDEX_BLOCK):
                block = np.frombuffer(
                    self._lengths.read(4 * min(_INDEX_BLOCK, n - start)), np.int32
                )
                pointers = np.empty(len(block), np.int64)
                pointers[0] = offset
                np.cumsum(block[:-1], dtype=np.int64, out=pointers[1:])
                pointers[1:] = pointers[1:] * self.dtype.itemsize + offset
                offset += int(block.sum(dtype=np.int64)) * self.dtype.itemsize
                f.write(pointers.tobytes())
            for start in range(0, n + 1, _INDEX_BLOCK):
                f.write(
                    np.arange(start, min(start + _INDEX_BLOCK, n + 1), dtype=np.int64).tobytes()
                )
            f.flush()
            os.fsync(f.fileno())
        self._lengths.close()
        os.unlink(self._tmp_lengths)
        if self.vocab_size is not None:
            record: dict = {"vocab_size": int(self.vocab_size), "max_token_id": self.max_token_id}
            if self.tokenizer is not None:
                record["tokenizer"] = dataclasses.asdict(self.tokenizer)
            with open(self._tmp_vocab, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
                f.write("\n")
        # An old .idx next to the new .bin would look complete: remove it before the swap.
        if os.path.exists(idx_path(self.prefix)):
            os.unlink(idx_path(self.prefix))
        # A stale record of an older dataset at this prefix must not describe the new one.
        if os.path.exists(vocab_path(self.prefix)):
            os.unlink(vocab_path(self.prefix))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        if self.vocab_size is not None:
            os.replace(self._tmp_vocab, vocab_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        _fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))
        self._closed = True

    def abort(self) -> None:
        """Close and delete the temporary files; nothing at ``prefix`` is touched."""
        for f in (self._bin, self._lengths):
            if not f.closed:
                f.close()
        for p in (self._tmp_bin, self._tmp_idx, self._tmp_vocab, self._tmp_lengths):
            if os.path.exists(p):
                os.unlink(p)
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


# Index entries per block when finalize() streams the lengths into .idx (16 M: 64-128 MB).
_INDEX_BLOCK = 16 * 1024 * 1024
# Bytes per read/write when the kernel cannot copy between the files itself.
_COPY_BLOCK = 8 * 1024 * 1024


def _copy_file(src, dst, nbytes: int) -> None:
    """Copy ``nbytes`` from ``src``'s position to ``dst``'s position (both binary files).

    ``os.copy_file_range`` keeps the bytes in the kernel (and may share extents on CoW
    filesystems); elsewhere, or across filesystems that refuse it, a bounded-buffer copy.
    """
    if nbytes == 0:
        return
    copy = getattr(os, "copy_file_range", None)
    if copy is not None:
        if src.writable():
            src.flush()
        dst.flush()
        in_fd, out_fd = src.fileno(), dst.fileno()
        in_off, out_off = os.lseek(in_fd, 0, os.SEEK_CUR), os.lseek(out_fd, 0, os.SEEK_CUR)
        left = nbytes
        try:
            while left:
                done = copy(in_fd, out_fd, left, in_off, out_off)
                if done == 0:
                    raise DataError(f"{src.name}: ended {left} bytes early while merging")
                in_off, out_off, left = in_off + done, out_off + done, left - done
        except OSError:
            if left != nbytes:
                raise  # part copied: do not mix the two methods
        else:
            # Offsets were explicit: move both file positions past the copied bytes.
            src.seek(in_off)
            dst.seek(out_off)
            return
    left = nbytes
    while left:
        block = src.read(min(left, _COPY_BLOCK))
        if not block:
            raise DataError(f"{src.name}: ended {left} bytes early while merging")
        dst.write(block)
        left -= len(block)


@dataclass(frozen=True)
class Shard:
    """A finished :class:`ShardWriter` part: ``bin_path`` holds ``tokens`` tokens of ``dtype``
    (numpy ``dtype.str``), ``lengths_path`` the int32 length of each of its ``documents``."""

    bin_path: str
    lengths_path: str
    dtype: str
    documents: int
    tokens: int
    max_token_id: int

    def remove(self) -> None:
        for p in (self.bin_path, self.lengths_path):
            if os.path.exists(p):
                os.unlink(p)


class ShardWriter:
    """One part of a dataset, written by a preprocessing worker and merged in order into an
    :class:`IndexedDatasetWriter` with :meth:`IndexedDatasetWriter.append_shard`.

    Two plain files, ``PATH.bin`` (tokens) and ``PATH.lengths`` (int32 per document); no index,
    no fsync (the merged dataset is synced once, when it is finalized). Use as a context
    manager: on an exception both files are deleted.
    """

    def __init__(self, path: str, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.path = path
        self._bin = open(path + ".bin", "wb")
        self._lengths = open(path + ".lengths", "wb")
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ``tokens`` and per-document ``lengths``."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != len(tokens):
            raise ValueError("lengths do not add up to the number of tokens")
        self._bin.write(tokens.tobytes())
        self._lengths.write(lengths.tobytes())
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def close(self) -> Shard:
        """Close the files and describe them for :meth:`IndexedDatasetWriter.append_shard`."""
        self._bin.close()
        self._lengths.close()
        return Shard(
            self.path + ".bin",
            self.path + ".lengths",
            self.dtype.str,
            self.documents,
            self.tokens,
            self.max_token_id,
        )

    def abort(self) -> None:
        """Close and delete both files."""
        self._bin.close()
        self._lengths.close()
        Shard(self.path + ".bin", self.path + ".lengths", "", 0, 0, -1).remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# Tokens per read when scanning a dataset without a vocab record (256 MB of uint16).
_SCAN_TOKENS = 128 * 1024 * 1024


_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")


def vocab_record(prefix: str) -> dict | None:
    """``PREFIX.vocab.json`` as ``{"vocab_size", "max_token_id"}``, plus ``"tokenizer"``
    (``{"fingerprint", "path", "settings"}``, see :class:`TokenizerRecord`) when it records one;
    None when there is no file."""
    path = vocab_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        out: dict = {
            "vocab_size": int(record["vocab_size"]),
            "max_token_id": int(record["max_token_id"]),
        }
        if record.get("tokenizer") is not None:
            tok = record["tokenizer"]
            fingerprint = tok["fingerprint"]
            if not isinstance(fingerprint, str) or not _FINGERPRINT_RE.fullmatch(fingerprint):
                raise ValueError(f"tokenizer fingerprint {fingerprint!r} is not 64 hex digits")
            out["tokenizer"] = {
                "fingerprint": fingerprint,
                "path": str(tok.get("path", "")),
                "settings": str(tok.get("settings", "")),
            }
        return out
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise DataError(
            f"{path}: unreadable vocabulary record ({e}); delete it to have the "
            "dataset scanned instead, or preprocess again"
        ) from None


def tokenizer_record(record: dict | None) -> TokenizerRecord | None:
    """The :class:`TokenizerRecord` of a :func:`vocab_record` (None: none recorded)."""
    if record is None or "tokenizer" not in record:
        return None
    return TokenizerRecord(**record["tokenizer"])


def merged_vocab(prefixes: list[str]) -> dict:
    """Keyword arguments for the :class:`IndexedDatasetWriter` of a merge of ``prefixes``:
    ``vocab_size`` when every input records one, and ``tokenizer`` when every input records
    the same tokenizer (an input without a fingerprint, from before them, leaves the size only).

    Raises:
        DataError: the inputs record different tokenizer sizes or fingerprints (their ids mean
            different tokens), listing each input's.
    """
    records = {p: vocab_record(p) for p in prefixes}
    if not records or any(r is None for r in records.values()):
        return {}
    sizes = {r["vocab_size"] for r in records.values() if r is not None}
    if len(sizes) > 1:
        listing = ", ".join(f"{p}: {r['vocab_size']}" for p, r in records.items() if r)
        raise DataError(
            f"inputs were made with tokenizers of different sizes ({listing}); their token ids "
            "mean different tokens: preprocess them with one tokenizer"
        )
    kwargs: dict = {"vocab_size": sizes.pop()}
    toks = {p: tokenizer_record(r) for p, r in records.items()}
    if any(t is None for t in toks.values()):
        return kwargs
    if len({t.fingerprint for t in toks.values() if t is not None}) > 1:
        listing = "; ".join(f"{p}: {t.describe()}" for p, t in toks.items() if t is not None)
        raise DataError(
            f"inputs were made with different tokenizers of {kwargs['vocab_size']} tokens "
            f"({listing}); their token ids mean different tokens: preprocess them with one "
            "tokenizer"
        )
    kwargs["tokenizer"] = toks[prefixes[0]]
    return kwargs


def max_token_id(prefix: str) -> int:
    """The largest token id in ``PREFIX.bin`` (-1 when empty), read in chunks through the
    memory map: one sequential pass, constant memory."""
    ds = IndexedDataset(prefix)
    tokens, top = ds._bin, -1
    for start in range(0, len(tokens), _SCAN_TOKENS):
        top = max(top, int(tokens[start : start + _SCAN_TOKENS].max()))
    return top


def check_vocab(
    prefix: str,
    vocab_size: int,
    where: str,
    tokenizer: TokenizerRecord | None = None,
    name: str = "data.tokenizer",
) -> None:
    """Raise DataError unless the dataset at ``prefix`` holds ids of the tokenizer the data is
    read with (``name``, e.g. ``data.tokenizer=tok``): ``vocab_size`` tokens (its true size,
    not the model's padded vocabulary) and, when given, its ``tokenizer`` record (fingerprint);
    ``where`` names the dataset (e.g. ``data.paths[0]``).

    With ``PREFIX.vocab.json`` (free): the recorded tokenizer size must equal ``vocab_size``,
    and a recorded fingerprint must equal ``tokenizer``'s. A dataset made with another
    tokenizer is refused even when its ids fit: they mean other tokens (a smaller one's ids all
    fit a larger vocabulary; another one of the same size fits exactly). A record without a
    fingerprint (older datasets) gets the size check only. Without the record (older datasets,
    other tools) ``.bin`` is scanned, and only ids past ``vocab_size`` can be found."""
    record = vocab_record(prefix)
    recorded_in = os.path.basename(vocab_path(prefix))
    if record is not None and record["vocab_size"] != vocab_size:
        raise DataError(
            f"{where}={prefix}: preprocessed with a tokenizer of {record['vocab_size']} tokens "
            f"(recorded in {recorded_in}, largest id "
            f"{record['max_token_id']}), but {name} has {vocab_size}: the same ids "
            "would mean other tokens; preprocess it again with data.tokenizer, or train with "
            "the tokenizer it was made with"
        )
    made_with = tokenizer_record(record)
    if made_with is not None and tokenizer is not None:
        if made_with.fingerprint != tokenizer.fingerprint:
            raise DataError(
                f"{where}={prefix}: preprocessed with another tokenizer "
                f"({made_with.describe()}; recorded in {recorded_in}) than {name} "
                f"({tokenizer.describe(with_path=False)}), although both have {vocab_size} "
                "tokens: the same ids mean other tokens; preprocess it again with "
                "data.tokenizer, or train with the tokenizer it was made with (or a model "
                "directory's copy of it)"
            )
    top = record["max_token_id"] if record is not None else max_token_id(prefix)
    if top >= vocab_size:
        raise DataError(
            f"{where}={prefix}: token id {top} does not fit the model's vocabulary of "
            f"{vocab_size} (ids 0-{vocab_size - 1}, the size of data.tokenizer); preprocess it "
            "again with data.tokenizer, or train with the tokenizer it was made with"
        )


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
