"""Tokenizers of the Chinese GPT-3 families behind one interface.

Three on-disk formats are supported, all loaded from local files (no hub access):

* ``tokenizer.json`` -- **jieba-BPE**, the tokenizer of the 1.3B+ ModelScope models: the text is
  segmented by jieba and the pieces are encoded with a Hugging Face ``tokenizers`` model as
  pre-tokenized input. Specials: ``<|endoftext|>`` (document end), ``<sep>`` (end of a fine-tuning
  sample; decoding stops at the first one), ``\\n`` a real token. ``megagpt tokenizer train``
  writes this format (see :mod:`megagpt.data.tokenizer_train`).
* ``vocab.txt`` -- **BERT Chinese WordPiece** (base/large models). Lossy by design: lower-cases,
  drops whitespace, maps out-of-vocabulary characters to ``[UNK]``. Decoding removes the spaces
  WordPiece puts between Chinese characters.
* ``*.model`` -- **SentencePiece with jieba**, the CPM style: jieba pieces, with ``' '`` mapped to
  ``▂`` and ``'\\n'`` to ``▃``, are joined by spaces and encoded by SentencePiece.

:func:`build_tokenizer` detects the family from the path.

Every tokenizer has a :attr:`Tokenizer.fingerprint`: a SHA-256 of what maps text to ids (the
vocabulary / merges / model file's content and the settings that change ids, such as the
segmenter), never of paths, so the same files copied elsewhere (a model directory's
``tokenizer/``) give the same fingerprint. Preprocessing records it with a dataset and training
refuses data made with another tokenizer of the same size (:func:`indexed.check_vocab`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from megagpt.data.errors import DataError
from megagpt.data.segment import DEFAULT_SEGMENTER, get_segmenter

# Sidecar written next to tokenizer.json by `megagpt tokenizer train`; records the segmenter the
# vocabulary was trained with so that encoding at training/inference time segments the same way.
SIDECAR_NAME = "megagpt_tokenizer.json"
# ModelScope's preprocessor of the 1.3B+ family (configuration.json), which segments with jieba.
MODELSCOPE_JIEBA_PREPROCESSOR = "text-gen-jieba-tokenizer"

EOD_TOKEN = "<|endoftext|>"
SEP_TOKEN = "<sep>"
PAD_TOKEN = "<pad>"
# New pieces per sequence sent to the encoder (see JiebaBPETokenizer._encode_cached).
_MISS_GROUP = 4096
_PIECE_CACHE_SIZE = 1_000_000  # distinct jieba pieces kept per process (~100-200 MB at most)
# Hashed first into every fingerprint. Bump it only when the same files must stop matching the
# datasets made before (e.g. the code's fixed settings below change the ids): old datasets are
# then refused, so say so in the change log.
FINGERPRINT_SCHEME = "megagpt-tokenizer-fingerprint/1"


class Tokenizer(ABC):
    """Common interface: ``encode``/``decode``, special ids, true and padded vocab size.

    ``eod``, ``sep`` and ``pad`` are token ids, or ``None`` where the family has no such token.
    Pretraining needs ``eod`` (the document separator of ``--append-eod``). ``bos`` is the id
    every text of the family starts with where it has one (BERT's ``[CLS]``: ModelScope's
    base/large models read ``[CLS] text``); megagpt puts it in front of every document,
    fine-tuning sample, prompt and scored text (:meth:`start`).
    """

    family: str
    path: str
    vocab_size: int
    eod: int | None
    sep: int | None
    pad: int | None
    bos: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, faster where the backend batches."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""

    def decode_stable(self, ids: Iterable[int], keep: int = 0) -> str:
        """The longest start of ``decode(ids)`` that no later token can change: the text shown
        while a generation is still growing. Here: without the bytes of an unfinished
        character at its end (:func:`complete_text`; ``keep``: characters never cut)."""
        return complete_text(self.decode(ids), keep)

    def start(self, ids: list[int]) -> list[int]:
        """``ids`` as a text's start: ``[bos] + ids`` for a family with :attr:`bos`, else
        ``ids`` (which an empty prompt leaves empty: see :meth:`encode_prompt`)."""
        return [self.bos, *ids] if self.bos is not None else ids

    def last(self, ids: list[int], n: int) -> list[int]:
        """The last ``n`` ids of a text, cut on the left, keeping its ``bos`` first (a text of
        the BERT family stays ``[CLS] ...``)."""
        if len(ids) <= n:
            return ids
        if self.bos is not None and ids[:1] == [self.bos] and n > 1:
            return [self.bos, *ids[len(ids) - n + 1 :]]
        return ids[len(ids) - n :]

    @property
    def context_id(self) -> int | None:
        """The id a text's first token is predicted from: :attr:`bos`, else the end of the
        previous document (:attr:`eod`); None when the family has neither."""
        return self.bos if self.bos is not None else self.eod

    def encode_prompt(self, text: str) -> list[int]:
        """The ids generation starts from for ``text``: :meth:`start` of its ids; an empty
        prompt without ``bos`` starts a new document (``[eod]``); [] when there is no such
        token (the caller reports it)."""
        ids = self.start(self.encode(text))
        if not ids and self.eod is not None:
            ids = [self.eod]
        return ids

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of what maps text to ids: the family, the settings that change ids
        (:attr:`settings`) and the content of the vocabulary / model file, never its path.

        The same files copied to another folder give the same value, in any process (no
        Python ``hash``). Computed on first use (reads the file once more) and cached.
        """
        h = hashlib.sha256()
        for part in (FINGERPRINT_SCHEME, self.family, self.settings, *self._content()):
            data = part.encode("utf-8") if isinstance(part, str) else part
            # Length-prefixed: no two different part lists hash the same bytes.
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    @property
    def settings(self) -> str:
        """The settings beyond the file that change ids, e.g. ``"segmenter rjieba"``
        (part of :attr:`fingerprint`; shown in messages)."""
        return ""

    @abstractmethod
    def _content(self) -> list[bytes | str]:
        """The vocabulary / model file's content as hashed by :attr:`fingerprint`."""

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab size rounded up to a multiple of ``128 * tp`` (embedding rows of the model).

        Padding keeps every tensor-parallel shard of the embedding the same, GEMM-friendly size;
        the extra rows are never produced by the tokenizer. ``vocab_size`` stays the true size.
        """
        if tp < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
        multiple = 128 * tp
        return -(-self.vocab_size // multiple) * multiple

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"eod={self.eod}, sep={self.sep}, pad={self.pad})"
        )


_UNFINISHED = "\ufffd"  # what a UTF-8 decoder shows for the bytes of an unfinished character


def complete_text(text: str, keep: int = 0) -> str:
    """``text`` without the U+FFFD run at its end (past its first ``keep`` characters).

    A byte-level tokenizer decodes the bytes of a character cut between tokens as U+FFFD; once
    the next token completes it, the same prefix decodes to the real character. UTF-8 resyncs
    at every character start, so the text before the cut never changes: cutting the trailing
    run gives a prefix of every later text. Bytes that are invalid for good (a U+FFFD followed
    by more text) are shown as the decoder shows them.
    """
    end = len(text)
    while end > keep and text[end - 1] == _UNFINISHED:
        end -= 1
    return text[:end]


class JiebaBPETokenizer(Tokenizer):
    """jieba segmentation + Hugging Face ``tokenizer.json`` (the ModelScope 1.3B+ family).

    Args:
        path: the ``tokenizer.json`` file.
        segmenter: ``"rjieba"`` or ``"jieba"``; default: the one the folder records
            (:func:`recorded_segmenter`: ``jieba`` in a ModelScope model directory, as its
            pipeline segments), else :data:`segment.DEFAULT_SEGMENTER`.
    """

    family = "jieba-bpe"

    def __init__(self, path: str, segmenter: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as exc:  # the Rust loader raises a bare Exception with its reason
            raise DataError(f"{path}: not a valid Hugging Face tokenizer.json ({exc})") from exc
        if segmenter is None:
            segmenter = recorded_segmenter(os.path.dirname(path))
        self.segmenter_name = segmenter
        self._segment = get_segmenter(segmenter)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = vocab.get(EOD_TOKEN)
        self.sep = vocab.get(SEP_TOKEN)
        self.pad = vocab.get(PAD_TOKEN)
        self.newline = vocab.get("\n")
        # With pre-tokenized input every piece is normalised, pre-tokenized and BPE-encoded on
        # its own, so a document's ids are the concatenation of its pieces' ids -- unless the
        # file adds tokens around the whole sequence or cuts it. Then we leave it to the library.
        self._piece_cache: dict[str, list[int]] | None = (
            {} if self._tok.post_processor is None and self._tok.truncation is None else None
        )

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        pieces = [self._segment(t) for t in texts]
        if self._piece_cache is None:
            return [e.ids for e in self._tok.encode_batch(pieces, is_pretokenized=True)]
        return self._encode_cached(pieces)

    def _encode_cached(self, docs: list[list[str]]) -> list[list[int]]:
        # Chinese text repeats a small set of words: looking pieces up in a dict is ~50x faster
        # than sending every piece through the Rust encoder again (see BENCHMARKS-data.md).
        cache = self._piece_cache
        missing = {p for pieces in docs for p in pieces if p not in cache}
        if len(cache) + len(missing) > _PIECE_CACHE_SIZE:
            cache.clear()  # bounded memory; the next batches refill it with the common words
            missing = {p for pieces in docs for p in pieces}
        if missing:
            # New pieces go through the encoder as a few long pre-tokenized sequences, not one
            # tiny sequence each (half the cost when a worker's cache is filling: every piece
            # is still normalised and BPE-encoded on its own); ``word_ids`` says which piece
            # each id came from. A piece that encodes to nothing gets [].
            new = list(missing)
            groups = [new[i : i + _MISS_GROUP] for i in range(0, len(new), _MISS_GROUP)]
            for group, enc in zip(groups, self._tok.encode_batch(groups, is_pretokenized=True)):
                found: list[list[int]] = [[] for _ in group]
                for token, word in zip(enc.ids, enc.word_ids):
                    if word is not None:
                        found[word].append(token)
                cache.update(zip(group, found))
        get = cache.__getitem__
        return [list(itertools.chain.from_iterable(map(get, pieces))) for pieces in docs]

    @property
    def settings(self) -> str:
        # None means the default segmenter: a tokenizer.json without a sidecar (a model
        # directory's copy of the bare file, ModelScope's) segments as one that records it.
        return f"segmenter {self.segmenter_name or DEFAULT_SEGMENTER}"

    def _content(self) -> list[bytes | str]:
        # The JSON's canonical form: key order and whitespace do not change the ids.
        return [_canonical_json(self.path)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self.sep is not None and self.sep in ids:
            # ModelScope's detokenize: a fine-tuning sample ends at its first <sep>.
            ids = ids[: ids.index(self.sep)]
        return self._tok.decode(ids, skip_special_tokens=True)


# What ModelScope's base/large pipeline counts as a Chinese "word" when it joins the decoded
# text (reference §2.1): Han ideographs (the ranges BERT splits one per token), Chinese
# punctuation (full-width forms, CJK symbols, quotes and dashes, listed below as ranges) and
# ASCII punctuation.
_HAN = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2F800, 0x2FA1F),
)  # fmt: skip
_CHINESE_PUNCTUATION = (
    (0x00B7, 0x00B7), (0x2013, 0x2014), (0x2018, 0x2019), (0x201B, 0x201F), (0x2026, 0x2027),
    (0x3000, 0x3003), (0x3008, 0x3011), (0x3014, 0x301F), (0x3030, 0x3030), (0x303E, 0x303F),
    (0xFE4F, 0xFE4F), (0xFE51, 0xFE51), (0xFE54, 0xFE54), (0xFF01, 0xFF0D), (0xFF0F, 0xFF0F),
    (0xFF1A, 0xFF20), (0xFF3B, 0xFF40), (0xFF5B, 0xFF64),
)  # fmt: skip
_CHINESE_WORD_CHARS = frozenset(
    [chr(c) for lo, hi in _HAN + _CHINESE_PUNCTUATION for c in range(lo, hi + 1)]
    + list(string.punctuation)
)


def _is_chinese_word(word: str) -> bool:
    return all(ch in _CHINESE_WORD_CHARS for ch in word)


def join_chinese_words(text: str) -> str:
    """Join the space-separated runs of Chinese words of a decoded text, as ModelScope's
    base/large pipeline does after decoding (reference §2.1).

    WordPiece decoding puts a space between every two tokens. Words made only of Han
    characters and punctuation (Chinese or ASCII) that follow each other are joined without
    one; the spaces around any other word (Latin, digits, mixed) stay:
    ``"我 用 iphone 15 手 机 。"`` -> ``"我用 iphone 15 手机。"``.
    """
    words: list[str] = []
    for chinese, run in itertools.groupby(text.split(" "), key=_is_chinese_word):
        part = list(run)
        words.extend(["".join(part)] if chinese else part)
    return " ".join(words).strip()


class BertTokenizer(Tokenizer):
    """BERT Chinese WordPiece from ``vocab.txt`` (the base/large family).

    ``eod`` and ``sep`` are both ``[SEP]`` and ``bos`` is ``[CLS]``: ModelScope's pipeline
    wraps every text as ``[CLS] text [SEP]`` (reference §2.1) and the family has no separate
    document token.
    """

    family = "bert"

    def __init__(self, path: str, lowercase: bool = True) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers

        self.path = path
        self.lowercase = lowercase
        vocab = _read_vocab_txt(path)
        model = models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
        tok = HFTokenizer(model)
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
        tok.add_special_tokens(specials)
        self._tok = tok
        self.vocab_size = len(vocab)
        self.sep = vocab.get("[SEP]")
        self.eod = self.sep
        self.bos = vocab.get("[CLS]")
        self.pad = vocab.get("[PAD]")
        self._special_ids = {vocab[t] for t in specials}
        self.unk = vocab.get("[UNK]")

    @property
    def settings(self) -> str:
        return "lowercase" if self.lowercase else "cased"

    def _content(self) -> list[bytes | str]:
        # The tokens in id order, as read (a CRLF copy of the file maps text to the same ids).
        return ["\n".join(_read_vocab_txt(self.path))]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return join_chinese_words(self._words(ids))

    def decode_stable(self, ids: Iterable[int], keep: int = 0) -> str:
        """All words but the last: a ``##`` piece may still grow it, and whether it is a
        Chinese word decides the space before it (``join_chinese_words`` of a text's first
        words is a start of the whole text's)."""
        words = self._words(ids).split(" ")
        return join_chinese_words(" ".join(words[:-1]))

    def _words(self, ids: Iterable[int]) -> str:
        """WordPiece's decoding, words separated by spaces. A text that starts inside a word
        (a continuation decoded on its own) shows its first piece without the ``##``."""
        ids = [i for i in ids if i not in self._special_ids]
        text = self._tok.decode(ids, skip_special_tokens=True)
        first = self._tok.id_to_token(ids[0]) if ids else None
        if first is not None and first.startswith("##") and len(first) > 2:
            text = text.removeprefix("##")
        return text


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece ``.model`` with jieba pre-segmentation (CPM style).

    When the model has the ``▂``/``▃`` pieces (CPM), spaces and newlines are mapped to them so
    they survive; otherwise the text is encoded as SentencePiece would on its own.
    """

    family = "sentencepiece"

    def __init__(self, path: str, segmenter: str | None = None) -> None:
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as exc:  # OSError / RuntimeError depending on the version
            raise DataError(f"{path}: not a valid SentencePiece model ({exc})") from exc
        self._segment = get_segmenter(segmenter)
        self.segmenter_name = segmenter
        sp = self._sp
        self.vocab_size = sp.get_piece_size()

        def piece(name: str) -> int | None:
            pid = sp.piece_to_id(name)
            return None if pid == sp.unk_id() and name != sp.id_to_piece(sp.unk_id()) else pid

        self.cpm_style = piece("\u2582") is not None and piece("\u2583") is not None
        self._to_sp = str.maketrans(" \n", "\u2582\u2583")
        self.eod = piece("<eod>")
        if self.eod is None:
            self.eod = sp.eos_id() if sp.eos_id() >= 0 else None
        self.sep = piece("<sep>")
        self.pad = sp.pad_id() if sp.pad_id() >= 0 else piece("<pad>")
        # CPM declares <eod>, <sep>, <mask> as user-defined pieces, which SentencePiece would
        # decode literally; decoding drops them like the control pieces.
        named = (piece(n) for n in ("<eod>", "<sep>", "<pad>", "<mask>", "<s>", "</s>"))
        self._special_ids = {i for i in named if i is not None} | {
            i for i in range(self.vocab_size) if sp.is_control(i)
        }

    @property
    def settings(self) -> str:
        # Only the CPM style segments; otherwise the segmenter never touches the ids.
        return f"segmenter {self.segmenter_name or DEFAULT_SEGMENTER}" if self.cpm_style else ""

    def _content(self) -> list[bytes | str]:
        return [_read_bytes(self.path)]

    def _prepare(self, text: str) -> str:
        if not self.cpm_style:
            return text
        return " ".join(p.translate(self._to_sp) for p in self._segment(text))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(self._prepare(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode([self._prepare(t) for t in texts])

    def decode(self, ids: Iterable[int]) -> str:
        text = self._sp.decode([int(i) for i in ids if int(i) not in self._special_ids])
        if self.cpm_style:
            # The spaces are the jieba piece boundaries added by _prepare; real ones are ▂.
            text = text.replace(" ", "").replace("\u2582", " ").replace("\u2583", "\n")
        return text


def _read_vocab_txt(path: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                token = line.rstrip("\r\n")
                if token in vocab:
                    # BERT's loader keeps the last id of a duplicate; say so instead.
                    raise DataError(f"{path}:{i + 1}: duplicate token {token!r} in vocab.txt")
                vocab[token] = i
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: vocab.txt is not UTF-8 ({exc})") from exc
    if not vocab:
        raise DataError(f"{path}: vocab.txt is empty")
    return vocab


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read the tokenizer file for its fingerprint ({exc})"
        ) from exc


def _canonical_json(path: str) -> str:
    try:
        obj = json.loads(_read_bytes(path))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def recorded_segmenter(directory: str) -> str | None:
    """The segmenter a tokenizer's folder records: its sidecar's (``megagpt_tokenizer.json``),
    else ``jieba`` beside a ModelScope ``configuration.json`` whose preprocessor is
    ``text-gen-jieba-tokenizer`` (ModelScope segments with ``jieba.cut``, reference §2.2: rjieba
    splits some ASCII runs otherwise); None: the default segmenter."""
    recorded = _read_sidecar(directory).get("segmenter")
    if recorded is not None:
        return recorded
    try:
        conf = json.loads(_read_bytes(os.path.join(directory, "configuration.json")))
    except (DataError, ValueError):
        return None
    pre = conf.get("preprocessor") if isinstance(conf, dict) else None
    if isinstance(pre, dict) and pre.get("type") == MODELSCOPE_JIEBA_PREPROCESSOR:
        return "jieba"
    return None


def _read_sidecar(directory: str) -> dict:
    path = os.path.join(directory, SIDECAR_NAME)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable tokenizer sidecar ({exc})") from exc


def build_tokenizer(path: str, segmenter: str | None = None) -> Tokenizer:
    """Load a tokenizer from ``path``, detecting its family.

    Args:
        path: a ``tokenizer.json`` file (jieba-BPE), a BERT ``vocab.txt``, a SentencePiece
            ``.model``, or a directory holding one of them (looked for in that order).
        segmenter: force ``"jieba"`` or ``"rjieba"`` for the families that segment first.

    Returns:
        A :class:`Tokenizer`.

    Raises:
        DataError: the path does not exist or holds no recognised tokenizer file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("tokenizer.json", "vocab.txt")]
        candidates += sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.endswith(".model")
        )
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise DataError(
                f"{path}: no tokenizer found; expected tokenizer.json (jieba-BPE), vocab.txt "
                "(BERT WordPiece) or a SentencePiece *.model in this directory"
            )
        path = found[0]
    elif not os.path.exists(path):
        raise DataError(f"{path}: tokenizer path does not exist")
    name = os.path.basename(path)
    if name.endswith(".json"):
        return JiebaBPETokenizer(path, segmenter=segmenter)
    if name.endswith(".txt"):
        return BertTokenizer(path)
    if name.endswith(".model"):
        return SentencePieceTokenizer(path, segmenter=segmenter)
    raise DataError(
        f"{path}: unknown tokenizer file type; expected tokenizer.json, vocab.txt or *.model"
    )
