"""Each filter of megagpt.curation.filters on crafted Chinese examples: keeps a normal wiki
paragraph, removes (or deletes the lines of) the junk it is for."""

from __future__ import annotations

import random

import numpy as np
import pytest

from megagpt.curation.config import CleanConfig, FilterConfig, NormalizeConfig
from megagpt.curation.filters import (
    Cleaner,
    codepoints,
    dup_line_stats,
    dup_ngram_share,
    shares,
    top_ngram_share,
)
from megagpt.curation.synthetic import JUNK

PARA = (
    "长城是中国古代的军事防御工程，是一道高大、坚固而且连绵不断的长垣，用以限隔敌骑的行动。"
    "长城不是一道单纯孤立的城墙，而是以城墙为主体，同大量的城、障、亭、标相结合的防御体系。"
    "春秋战国时期，各国为了防御别国入侵，修筑烽火台，并用城墙连接起来，形成最早的长城。"
)


def _cleaner(**filters) -> Cleaner:
    cfg = CleanConfig()
    for k, v in filters.items():
        setattr(cfg.filters, k, v)
    return Cleaner(cfg.normalize, cfg.filters)


def test_keeps_normal_paragraphs(wiki_docs):
    c = _cleaner()
    kept = [c.clean(t) for t in wiki_docs[:40]]
    assert all(r.reason is None for r in kept if "Church" not in r.text)
    assert c.clean(PARA).text == PARA  # nothing to change in clean Chinese text


@pytest.mark.parametrize("name", sorted(JUNK))
def test_planted_junk_is_caught_by_its_filter(name, wiki_docs):
    maker, expected = JUNK[name]
    c, rng = _cleaner(), random.Random(0)
    for text in wiki_docs[:5]:
        if "Church" in text:
            continue
        r = c.clean(maker(text, rng))
        if expected == "boilerplate":
            assert r.reason is None and r.boilerplate_lines
            assert r.text == c.normalize(text).strip("\n")  # exactly the planted lines went
        else:
            assert r.reason == expected and r.text is None


def test_length_counts_characters_not_words():
    c = _cleaner(min_chars=50)
    assert c.clean(PARA[:49]).reason == "length"  # one "word" to a whitespace tokenizer
    assert c.clean(PARA[:60]).reason is None
    assert _cleaner(max_chars=100).clean(PARA).reason == "length"


def test_shares():
    s = shares("中文abc123★ \n")
    assert s.chars == 9  # whitespace not counted
    assert s.cjk == pytest.approx(2 / 9) and s.latin == pytest.approx(3 / 9)
    assert s.digits == pytest.approx(3 / 9) and s.symbols == pytest.approx(1 / 9)


def test_cjk_filter_threshold():
    text = PARA[:60] + " the quick brown fox" * 4
    assert _cleaner(min_cjk_fraction=0.6, max_latin_fraction=1.0).clean(text).reason == "cjk"
    assert _cleaner(min_cjk_fraction=0.3, max_latin_fraction=1.0).clean(text).reason is None


def test_repetition_signals():
    assert dup_line_stats("甲\n乙\n甲\n甲\n") == (pytest.approx(0.5), pytest.approx(0.5))
    cp = codepoints("哈" * 100)
    assert top_ngram_share(cp, 2) == 1.0 and dup_ngram_share(cp, 10) == 1.0
    cp = codepoints(PARA)
    assert top_ngram_share(cp, 2) < 0.1 and dup_ngram_share(cp, 10) == 0.0
    # two copies of a 40-character phrase in 100 characters: 80 covered
    phrase, other = PARA[:40], PARA[40:60]
    assert dup_ngram_share(codepoints(phrase + other + phrase), 10) == pytest.approx(80 / 100)
    text = PARA + "\n".join([PARA[:30]] * 10)  # 8 of 10 lines repeat: the line share decides
    assert _cleaner().clean(text).reason == "dup-lines"


def test_few_long_repeated_lines_caught_by_character_share():
    """One long sentence repeated among four lines: 1/4 of the lines (under the 0.3 limit) but
    43/170 of the characters (over the 0.2 limit), so only the character share catches it."""
    s1, s2, s3 = (s + "。" for s in PARA.split("。")[:3])
    text = "\n".join([s1, s2, s3, s1])
    lines, chars = dup_line_stats(text)
    c = _cleaner()
    assert lines == 0.25 <= c.cfg.max_dup_line_fraction
    assert chars == pytest.approx(43 / 170) and chars > c.cfg.max_dup_line_char_fraction
    assert dup_ngram_share(codepoints(text), 10) < 0.8  # the n-gram filters would let it pass
    r = c.clean(text)
    assert r.reason == "dup-line-chars" and r.text is None
    assert c.clean("\n".join([s1, s2, s3])).reason is None  # the same lines, none repeated


def test_repeated_phrase_caught_by_duplicate_ngrams_not_top_ngram():
    """A paragraph pasted twice on one line: no repeated line and no dominant short n-gram, but
    every character lies in a 10-gram that occurs twice."""
    text = PARA + PARA
    cp = codepoints(text)
    c = _cleaner()
    assert dup_line_stats(text) == (0.0, 0.0)
    assert all(top_ngram_share(cp, n) <= limit for n, limit in c.cfg.top_ngram.items())
    assert dup_ngram_share(cp, 10) == 1.0
    r = c.clean(text)
    assert r.reason == "dup-ngram" and r.text is None
    assert c.clean(PARA).reason is None


def test_invalid_characters_deleted_or_document_dropped():
    c = _cleaner()
    doc = PARA + PARA[::-1]  # ~260 characters: 2 invalid ones are under the default 1%
    r = c.clean(doc[:80] + "\x0b\u200b" + doc[80:])  # a stray control and zero-width space
    assert r.text == doc and r.invalid_chars == 2
    r = c.clean("\x00\x01\ufffd".join(PARA[i : i + 5] for i in range(0, len(PARA), 5)))
    assert r.reason == "invalid-chars"


def test_nfkc_keeps_fullwidth_punctuation_unless_asked():
    text = PARA + "ＡＢＣ１２３，（注）！"
    kept = _cleaner().clean(text).text
    assert kept.endswith("ABC123，（注）！")  # letters/digits folded, Chinese punctuation kept
    norm = NormalizeConfig(halfwidth_punctuation=True)
    half = Cleaner(norm, FilterConfig()).clean(text).text
    assert half.endswith("ABC123,(注)!")
    assert Cleaner(NormalizeConfig(unicode_form="none"), FilterConfig()).clean(text).text == text


def test_traditional_to_simplified():
    pytest.importorskip("opencc")
    c = Cleaner(NormalizeConfig(traditional_to_simplified=True), FilterConfig(min_chars=1))
    assert c.clean("萬里長城是中國古代的軍事防禦工程").text == "万里长城是中国古代的军事防御工程"


def test_boilerplate_lines_deleted_only_when_short():
    c = _cleaner()
    text = "首页 > 新闻 > 正文\n" + PARA + "\n版权所有 © 2024 某网站\n点击这里关注我们"
    r = c.clean(text)
    assert r.text == PARA and len(r.boilerplate_lines) == 3
    long_line = "本法所称著作权人对其作品享有版权所有的权利，" + PARA  # content, not furniture
    assert c.clean(long_line).text == long_line


def test_off_switches():
    junk = "哈" * 100
    assert _cleaner(top_ngram={}, dup_ngram={}).clean(junk).reason is None
    assert np.isclose(_cleaner().cfg.min_cjk_fraction, 0.3)
