"""Tokenizer families: loading, round trips on real Chinese text, special ids, vocab padding."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest

from megagpt.data import DataError, build_tokenizer
from megagpt.data.tokenizer import (
    BertTokenizer,
    JiebaBPETokenizer,
    SentencePieceTokenizer,
    join_chinese_words,
)
from megagpt.data.tokenizer_train import train_tokenizer


@pytest.fixture(scope="module")
def bert(shared_data, data):
    return build_tokenizer(str(data.BERT_VOCAB))


@pytest.fixture(scope="module")
def cpm(shared_data, data):
    return build_tokenizer(str(data.CPM_MODEL))


# --- our own jieba-BPE ------------------------------------------------------------------------


def test_jieba_bpe_round_trips_real_text_exactly(tokenizer, wiki_texts, data):
    texts = wiki_texts[:100] + data.read_texts(data.POETRY, 50, key="text1")
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "MIXED",
        "汉字",
        "ASCII only, with  two spaces",
        "0123456789",
        "   leading and trailing   ",
        "\n\n\n",
        "，。！？：；（）",
        "😀🇨🇳👨‍👩‍👧",
        "",
    ],
)
def test_jieba_bpe_round_trips_every_character_class(tokenizer, text, data):
    text = data.MIXED_TEXT if text == "MIXED" else text
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_jieba_bpe_batch_encode_matches_single(tokenizer, wiki_texts, data):
    texts = wiki_texts[:20] + [data.MIXED_TEXT]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_jieba_bpe_specials_and_newline_token(tokenizer):
    assert isinstance(tokenizer, JiebaBPETokenizer)
    assert (tokenizer.pad, tokenizer.eod, tokenizer.sep) == (0, 1, 2)
    # "\n" is a real single token (ModelScope's loader looks it up by that string).
    assert tokenizer.newline is not None
    assert tokenizer.encode("\n") == [tokenizer.newline]
    # Literal special-token text in a document is text, never the control id.
    ids = tokenizer.encode("a<|endoftext|>b<sep>c")
    assert tokenizer.eod not in ids and tokenizer.sep not in ids


def test_jieba_bpe_decode_stops_at_first_sep_and_drops_eod(tokenizer):
    a, b = tokenizer.encode("问题：今天天气如何？"), tokenizer.encode("回答：晴。")
    assert tokenizer.decode(a + [tokenizer.eod] + b) == "问题：今天天气如何？回答：晴。"
    assert tokenizer.decode(a + [tokenizer.sep] + b) == "问题：今天天气如何？"


def test_trained_vocab_has_exactly_the_requested_size(tokenizer, tokenizer_dir):
    assert tokenizer.vocab_size == 4000
    sidecar = json.loads((tokenizer_dir / "megagpt_tokenizer.json").read_text())
    assert sidecar["segmenter"] == tokenizer.segmenter_name == "rjieba"
    assert sidecar["vocab_size"] == 4000


def test_train_rejects_too_small_vocab(tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["你好"], str(tmp_path), vocab_size=100)


def test_train_without_documents_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no documents"):
        train_tokenizer([], str(tmp_path), vocab_size=1000)


def test_jieba_and_rjieba_segmenters_both_round_trip(tokenizer_dir, data):
    for name in ("jieba", "rjieba"):
        tok = build_tokenizer(str(tokenizer_dir), segmenter=name)
        assert tok.segmenter_name == name
        assert tok.decode(tok.encode(data.MIXED_TEXT)) == data.MIXED_TEXT


def test_a_modelscope_directory_segments_with_jieba(tokenizer_dir, tmp_path):
    """ModelScope's 1.3B+ pipeline segments with jieba.cut: a tokenizer.json beside its
    configuration.json (jieba preprocessor, no megagpt settings file) does too, and keeps
    doing so when copied into a megagpt model directory."""
    import json
    import shutil

    from megagpt.checkpoint.model_dir import copy_tokenizer

    ms = tmp_path / "modelscope"
    ms.mkdir()
    shutil.copy2(tokenizer_dir / "tokenizer.json", ms / "tokenizer.json")
    assert build_tokenizer(str(ms)).segmenter_name is None  # nothing recorded: the default
    conf = {"preprocessor": {"type": "text-gen-jieba-tokenizer"}, "megatron": {}}
    (ms / "configuration.json").write_text(json.dumps(conf), encoding="utf-8")
    tok = build_tokenizer(str(ms))
    assert tok.segmenter_name == "jieba" and tok.settings == "segmenter jieba"
    text = "GPT-3 的版本 5.1.1 发布了"
    assert tok.encode(text) == build_tokenizer(str(ms), segmenter="jieba").encode(text)
    copy_tokenizer(str(tmp_path / "model"), str(ms / "tokenizer.json"))
    copied = build_tokenizer(str(tmp_path / "model" / "tokenizer"))
    assert copied.segmenter_name == "jieba" and copied.fingerprint == tok.fingerprint
    # Another preprocessor implies nothing; an explicit choice always wins.
    conf["preprocessor"]["type"] = "text-gen-tokenizer"
    (ms / "configuration.json").write_text(json.dumps(conf), encoding="utf-8")
    assert build_tokenizer(str(ms)).segmenter_name is None
    explicit = build_tokenizer(str(tmp_path / "model" / "tokenizer"), segmenter="rjieba")
    assert explicit.segmenter_name == "rjieba"


def test_unknown_segmenter_is_a_clear_error(tokenizer_dir):
    with pytest.raises(DataError, match="unknown segmenter"):
        build_tokenizer(str(tokenizer_dir), segmenter="nltk")


# --- BERT vocab.txt ---------------------------------------------------------------------------


def _bert_normal_form(text: str) -> str:
    """What BERT Chinese keeps: lower case, no accents, no whitespace."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return "".join(text.split())


def test_bert_round_trips_real_text_up_to_its_normalisation(bert, wiki_texts):
    checked = 0
    for text in wiki_texts[:150]:
        ids = bert.encode(text)
        if bert.unk in ids:
            continue  # characters outside the 21,128-token vocab are lost by design
        checked += 1
        decoded = bert.decode(ids)
        assert _bert_normal_form(decoded) == _bert_normal_form(text)
    assert checked > 60


def test_bert_decode_joins_chinese_words_as_modelscope(bert):
    # ModelScope's base/large pipeline joins runs of Chinese words only: the spaces around a
    # Latin word or a number stay (reference §2.1).
    text = "中华人民共和国成立于1949年。Hello World，你好！"
    assert bert.decode(bert.encode(text)) == "中华人民共和国成立于 1949 年。 hello world ，你好！"


def test_bert_ids_and_specials(bert):
    assert isinstance(bert, BertTokenizer)
    assert bert.vocab_size == 21128
    assert (bert.pad, bert.sep, bert.eod, bert.bos) == (0, 102, 102, 101)
    assert bert.encode("中国") == [704, 1744]
    assert bert.decode([101, 704, 1744, 102]) == "中国"


@pytest.mark.parametrize(
    ("decoded", "joined"),
    [
        ("中 国 hello world 你 好 ，", "中国 hello world 你好，"),
        ("我 用 iphone 15 手 机", "我用 iphone 15 手机"),
        # ASCII punctuation is part of a Chinese run; full-width forms and CJK symbols too
        ("你 好 , 世 界 ！ 「 书 」", "你好,世界！「书」"),
        # a lone punctuation mark between Latin words keeps its spaces; U+FF0E is not one of
        # the marks ModelScope lists, so it stays apart
        ("a , b", "a , b"),
        ("中 ． 国", "中 ． 国"),
        # extension-B ideographs; leading / trailing spaces are stripped
        (" \U00020000 \U00020001 x ", "\U00020000\U00020001 x"),
        ("", ""),
    ],
)
def test_join_chinese_words(decoded, joined):
    assert join_chinese_words(decoded) == joined


# --- SentencePiece (CPM) ----------------------------------------------------------------------


def test_cpm_sentencepiece_round_trips_spaces_and_newlines(cpm):
    assert isinstance(cpm, SentencePieceTokenizer) and cpm.cpm_style
    text = "我爱北京天安门 hello  world\n\n第二段。"
    ids = cpm.encode(text)
    assert cpm.decode(ids) == text
    assert 3 in ids and 10 in ids  # ▃ (newline) and ▂ (space) pieces


def test_cpm_sentencepiece_round_trips_real_text_up_to_nfkc(cpm, wiki_texts):
    # The CPM model normalises with NFKC (full-width -> half-width) and has no byte fallback.
    exact = checked = 0
    for text in wiki_texts[:150]:
        ids = cpm.encode(text)
        if 0 in ids:  # <unk>
            continue
        checked += 1
        exact += cpm.decode(ids) == unicodedata.normalize("NFKC", text)
    assert checked > 100 and exact >= 0.95 * checked


def test_cpm_specials(cpm):
    assert cpm.vocab_size == 30000
    assert (cpm.eod, cpm.sep, cpm.pad) == (7, 4, 5)
    assert cpm.decode(cpm.encode("你好") + [cpm.eod]) == "你好"


# --- detection and padding --------------------------------------------------------------------


def test_build_tokenizer_detects_family_from_file_or_directory(tmp_path, tokenizer_dir, data):
    BERT_VOCAB, CPM_MODEL = data.BERT_VOCAB, data.CPM_MODEL
    assert isinstance(build_tokenizer(str(tokenizer_dir / "tokenizer.json")), JiebaBPETokenizer)
    assert isinstance(build_tokenizer(str(tokenizer_dir)), JiebaBPETokenizer)
    assert isinstance(build_tokenizer(str(BERT_VOCAB.parent)), BertTokenizer)
    assert isinstance(build_tokenizer(str(CPM_MODEL.parent)), SentencePieceTokenizer)
    # A directory with a lone SentencePiece model of another name is found too.
    shutil.copy(CPM_MODEL, tmp_path / "spm.model")
    assert isinstance(build_tokenizer(str(tmp_path)), SentencePieceTokenizer)


@pytest.mark.parametrize("name", ["missing", "empty-dir", "bad.json", "notes.md"])
def test_build_tokenizer_errors_name_the_path(tmp_path, name):
    path = tmp_path / name
    if name == "empty-dir":
        path.mkdir()
    elif name != "missing":
        path.write_text("{not a tokenizer")
    with pytest.raises(DataError, match=str(path)):
        build_tokenizer(str(path))


@pytest.mark.parametrize(("tp", "expected"), [(1, 21248), (2, 21248), (4, 21504), (8, 21504)])
def test_padded_vocab_size_is_a_multiple_of_128_tp(bert, tp, expected):
    assert bert.padded_vocab_size(tp) == expected
    assert bert.vocab_size == 21128  # the true size is kept


def test_padded_vocab_size_of_default_size_is_unchanged(tokenizer):
    tokenizer_size = tokenizer.vocab_size
    assert tokenizer.padded_vocab_size(1) % 128 == 0 and tokenizer.padded_vocab_size(1) >= 4000
    assert tokenizer.vocab_size == tokenizer_size


def test_piece_cache_gives_exactly_the_library_encoding(tokenizer_dir, wiki_texts, monkeypatch):
    from tokenizers import Tokenizer as HFTokenizer

    from megagpt.data import tokenizer as tokenizer_module
    from megagpt.data.segment import get_segmenter

    hf = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    segment = get_segmenter("rjieba")
    expected = [hf.encode(segment(t), is_pretokenized=True).ids for t in wiki_texts[:60]]
    monkeypatch.setattr(tokenizer_module, "_PIECE_CACHE_SIZE", 500)  # forces cache resets
    # New pieces are encoded as long sequences split by word_ids: small groups, many splits.
    monkeypatch.setattr(tokenizer_module, "_MISS_GROUP", 37)
    tok = build_tokenizer(str(tokenizer_dir))
    texts = wiki_texts[:60]
    got = [ids for i in range(0, 60, 7) for ids in tok.encode_batch(texts[i : i + 7])]
    assert got == expected
    assert len(tok._piece_cache) <= 500 + 7 * max(len(segment(t)) for t in wiki_texts[:60])
