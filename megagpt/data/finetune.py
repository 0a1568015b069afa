"""Fine-tuning datasets: src_txt (continuation) or src_txt + tgt_txt samples with loss masks.

Sample layout (reference §5.1), for a model input of ``seq_length`` tokens::

    ids    = src + [sep]                 (continuation)    or  src + tgt + [sep]   (src+tgt)
    src    the source's ids, after the family's bos where it has one (BERT: [CLS] src, as
           ModelScope's base/large preprocessor; the first source token is then in the loss)
    ids    right-padded / truncated to seq_length + 1
    tokens = ids[:-1], labels = ids[1:]
    loss   continuation: label positions 0 .. len(src) - 1, i.e. every source token after the
           first and the closing <sep>;  src+tgt: label positions len(src) - 1 .. len(ids) - 2,
           i.e. the target tokens and the closing <sep>, never the prompt; never the padding.

The original pads its 128-id samples to model inputs of 127; here ``seq_length`` is the model
input itself (128 by default), as in pretraining where samples are seq_length + 1 ids.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megagpt.data.errors import DataError

MODES = ("auto", "continuation", "src_tgt")


def read_records(
    path: str, src_column: str = "src_txt", tgt_column: str = "tgt_txt"
) -> tuple[list[str], list[str] | None]:
    """(sources, targets or None) from a .jsonl or .csv file.

    ``src_column`` / ``tgt_column`` name the file's columns that play src_txt / tgt_txt (e.g.
    ``text1``). Targets are returned when every record has the tgt column. Raises DataError
    naming the file and line for unreadable records or a missing src column.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: fine-tuning data file does not exist")
    rows: list[tuple[int, dict]] = []
    if p.suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = [(i + 2, r) for i, r in enumerate(reader)]  # line 1 is the header
    elif p.suffix in (".jsonl", ".json"):
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{i}: each line must be a JSON object")
                rows.append((i, rec))
    else:
        raise DataError(f"{path}: unknown data format {p.suffix!r}; use .jsonl or .csv")
    if not rows:
        raise DataError(f"{path}: no records")
    sources, targets = [], []
    has_tgt = all(tgt_column in r for _, r in rows)
    for line, rec in rows:
        if src_column not in rec:
            keys = ", ".join(sorted(rec)) or "none"
            raise DataError(
                f"{path}:{line}: no column {src_column!r} (columns: {keys}); set "
                "finetune.src_column to the column holding the source text"
            )
        sources.append(str(rec[src_column] or ""))
        if has_tgt:
            targets.append(str(rec[tgt_column] or ""))
    return sources, (targets if has_tgt else None)


def encode_sample(
    src: list[int], tgt: list[int] | None, sep: int, pad: int, seq_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [seq_length + 1], loss_mask [seq_length]) of one sample, per the module docstring."""
    ids = list(src) + (list(tgt) if tgt is not None else []) + [sep]
    n_ids = min(len(ids), seq_length + 1)
    out = np.full(seq_length + 1, pad, dtype=np.int64)
    out[:n_ids] = ids[:n_ids]
    mask = np.zeros(seq_length, dtype=np.float32)
    if tgt is None:
        mask[: min(len(src), seq_length)] = 1.0
    else:
        mask[max(len(src) - 1, 0) : n_ids - 1] = 1.0
    return out, mask


@dataclass
class FinetuneDataset:
    """Encoded samples: ``ids`` [N, S+1] int64, ``loss_mask`` [N, S] float32; for src+tgt data
    also the source ids and target texts (for generation-based evaluation)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    paired: bool
    sources: list[list[int]] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.ids[i], "loss_mask": self.loss_mask[i]}

    @property
    def empty_samples(self) -> int:
        """Samples whose loss mask is all zero (e.g. a source filling the whole sample)."""
        return int((self.loss_mask.sum(axis=1) == 0).sum())


def special_ids(tokenizer) -> tuple[int, int]:
    """(sep, pad) ids for samples: ``<sep>`` (end-of-document when the tokenizer has none) and
    the pad id (end-of-document, else 0; padding is never attended to nor in the loss)."""
    sep = tokenizer.sep if tokenizer.sep is not None else tokenizer.eod
    if sep is None:
        raise DataError(
            f"{tokenizer.path}: the tokenizer has neither <sep> nor an "
            "end-of-document token to close fine-tuning samples"
        )
    pad = next((t for t in (tokenizer.pad, tokenizer.eod) if t is not None), 0)
    return sep, pad


def build_finetune_dataset(
    path: str,
    tokenizer,
    seq_length: int,
    *,
    src_column: str = "src_txt",
    tgt_column: str = "tgt_txt",
    mode: str = "auto",
) -> FinetuneDataset:
    """Read, tokenize and encode ``path``; ``mode`` auto picks src+tgt when targets exist."""
    if mode not in MODES:
        raise DataError(f"mode must be one of {MODES}, got {mode!r}")
    sources, targets = read_records(path, src_column, tgt_column)
    if mode == "src_tgt" and targets is None:
        raise DataError(f"{path}: mode src_tgt needs the column {tgt_column!r} in every record")
    if mode == "continuation":
        targets = None
    sep, pad = special_ids(tokenizer)
    src_ids = [tokenizer.start(s) for s in tokenizer.encode_batch(sources)]
    tgt_ids = tokenizer.encode_batch(targets) if targets is not None else [None] * len(sources)
    encoded = [encode_sample(s, t, sep, pad, seq_length) for s, t in zip(src_ids, tgt_ids)]
    ids = np.stack([e[0] for e in encoded])
    mask = np.stack([e[1] for e in encoded])
    if targets is None:
        return FinetuneDataset(ids, mask, paired=False)
    return FinetuneDataset(ids, mask, paired=True, sources=src_ids, targets=targets)


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Order of the ``n`` samples in ``epoch`` (a pure function: resuming needs no state)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_sample_indices(
    start: int, count: int, n: int, per_epoch: int, seed: int, shuffle: bool = True
) -> list[int]:
    """Dataset indices of global samples ``start .. start + count - 1``.

    Each epoch takes the first ``per_epoch`` samples of its permutation (whole global batches;
    the remainder, different every epoch when shuffled, waits for the next).
    """
    out = []
    for g in range(start, start + count):
        epoch, pos = divmod(g, per_epoch)
        out.append(int(epoch_permutation(n, epoch, seed, shuffle)[pos]))
    return out
