"""Train our own jieba-BPE ``tokenizer.json`` (``megagpt tokenizer train``).

The vocabulary is a byte-level BPE learned over jieba pieces: every document is segmented,
and the pieces are the "words" BPE merges within. Byte-level means any text round-trips
losslessly (Han, ASCII, digits, spaces, full-width punctuation, emoji, rare ideographs), with
no ``<unk>``. The file loads in :class:`JiebaBPETokenizer` and in ModelScope's
``JiebaBPETokenizer``: it has ``<|endoftext|>``, ``<sep>`` and a literal ``\\n`` token.

Vocabulary layout: ``<pad>`` 0, ``<|endoftext|>`` 1, ``<sep>`` 2, the 256 byte symbols, the
learned merges, and ``\\n`` last; ``vocab_size`` counts all of them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator

from megagpt.data.errors import DataError
from megagpt.data.readers import InputSpec, iter_documents
from megagpt.data.segment import DEFAULT_SEGMENTER, get_segmenter
from megagpt.data.tokenizer import (
    EOD_TOKEN,
    PAD_TOKEN,
    SEP_TOKEN,
    SIDECAR_NAME,
    JiebaBPETokenizer,
)

DEFAULT_VOCAB_SIZE = 25600  # the size of the ModelScope 1.3B+ tokenizer
SPECIAL_TOKENS = (PAD_TOKEN, EOD_TOKEN, SEP_TOKEN)
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + 1
# Documents re-encoded after training to prove the round trip on the user's own data.
_CHECK_DOCS = 200


def train_tokenizer(
    documents: Iterable[str],
    output_dir: str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    segmenter: str | None = None,
    min_frequency: int = 2,
) -> JiebaBPETokenizer:
    """Learn a jieba-BPE vocabulary from ``documents`` and write ``output_dir/tokenizer.json``.

    Args:
        documents: texts to learn from (consumed once).
        output_dir: created if missing; ``tokenizer.json`` and ``megagpt_tokenizer.json``
            (segmenter and provenance) are written there atomically.
        vocab_size: total size including special tokens and ``\\n``. A corpus too small to
            supply that many merges gives a smaller vocabulary (reported by the CLI).
        segmenter: ``"rjieba"`` (default) or ``"jieba"``; recorded so encoding matches.
        min_frequency: a merge must occur at least this often.

    Returns:
        The trained tokenizer, loaded back from disk.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < _MIN_VOCAB:
        raise DataError(
            f"--vocab-size {vocab_size} is too small: at least {_MIN_VOCAB} (3 special tokens, "
            "256 byte symbols and the newline token)"
        )
    segmenter = segmenter or DEFAULT_SEGMENTER
    segment = get_segmenter(segmenter)
    tok = HFTokenizer(models.BPE())
    # use_regex=False: jieba is the only word splitter, as at encode time.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # "\n" is added afterwards
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = {"docs": 0}
    sample: list[str] = []

    def pieces() -> Iterator[list[str]]:
        for doc in documents:
            seen["docs"] += 1
            if len(sample) < _CHECK_DOCS:
                sample.append(doc)
            yield segment(doc)

    tok.train_from_iterator(pieces(), trainer=trainer)
    if seen["docs"] == 0:
        raise DataError("no documents to train the tokenizer on")
    # A real "\n" token (not special, so decoding keeps it): ModelScope's loader requires it.
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])

    os.makedirs(output_dir, exist_ok=True)
    target = os.path.join(output_dir, "tokenizer.json")
    tmp = f"{target}.tmp.{os.getpid()}"
    tok.save(tmp)
    sidecar = {
        "family": "jieba-bpe",
        "segmenter": segmenter,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "special_tokens": {"pad": PAD_TOKEN, "eod": EOD_TOKEN, "sep": SEP_TOKEN},
        "trained_on_documents": seen["docs"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json_atomic(os.path.join(output_dir, SIDECAR_NAME), sidecar)
    os.replace(tmp, target)

    trained = JiebaBPETokenizer(target)
    for i, doc in enumerate(sample):
        if trained.decode(trained.encode(doc)) != doc:
            raise DataError(
                f"internal error: the trained tokenizer does not round-trip document {i + 1}; "
                "please report it with that document"
            )
    return trained


def train_tokenizer_from_files(
    specs: list[InputSpec],
    output_dir: str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    segmenter: str | None = None,
    skip_bad_lines: bool = False,
) -> tuple[JiebaBPETokenizer, dict]:
    """:func:`train_tokenizer` over the documents of ``specs``; also returns skip counts."""
    skipped: dict = {}
    docs = iter_documents(specs, skip_bad_lines=skip_bad_lines, skipped=skipped)
    return train_tokenizer(docs, output_dir, vocab_size, segmenter), skipped


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)
