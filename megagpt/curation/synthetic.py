"""Planted near-duplicates and junk for measuring ``megagpt clean`` (tests and bench/clean.py).

:func:`near_copy` edits a real document the way copies on the web differ: a few characters
substituted, a sentence inserted or removed, punctuation changed. :data:`JUNK` makes documents
that a filter must remove or lines it must delete, each tagged with the filter expected.
All functions take a ``random.Random`` so a seed reproduces the same corpus.
"""

from __future__ import annotations

import random
import re

EDITS = ("substitute", "insert", "remove", "punctuation")
_SENTENCE = re.compile(r"(?<=[。！？；])")
_PUNCT = {"，": ",", "。": ".", "；": ";", "：": ":", "（": "(", "）": ")", "、": ","}
_FILLER = "这是一个新插入的句子，用来模拟网页转载时编辑添加的内容。"


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text) if s]


def near_copy(text: str, rng: random.Random, edit: str, other: str = "") -> str:
    """A copy of ``text`` with one kind of small ``edit`` (see :data:`EDITS`); ``other`` is a
    document to borrow an inserted sentence from."""
    if edit == "substitute":  # ~1% of the characters (at least 2) replaced by other Han
        chars = list(text)
        for _ in range(max(2, len(chars) // 100)):
            i = rng.randrange(len(chars))
            chars[i] = chr(rng.randrange(0x4E00, 0x9FA5))
        return "".join(chars)
    if edit == "insert":
        parts = _sentences(text)
        donor = _sentences(other) or [_FILLER]
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(donor))
        return "".join(parts)
    if edit == "remove":
        parts = _sentences(text)
        if len(parts) > 2:
            del parts[rng.randrange(len(parts))]
        return "".join(parts)
    if edit == "punctuation":
        return "".join(_PUNCT.get(c, c) for c in text).replace(",", ", ")
    raise ValueError(f"unknown edit {edit!r}")


def _boilerplate_wrapped(text: str, rng: random.Random) -> str:
    head = rng.choice(["首页 > 新闻中心 > 正文", "当前位置：首页 > 法律法规", "上一篇：关于我们"])
    tail = rng.choice(
        [
            "版权所有 © 2023 某某网 京ICP备12345678号",
            "点击这里关注我们的微信公众号",
            "本网站使用Cookie以改善您的浏览体验。",
        ]
    )
    return f"{head}\n{text}\n{tail}"


def _symbol_soup(text: str, rng: random.Random) -> str:
    # Enough Chinese left to pass the CJK filter: the symbol filter must catch it.
    out = []
    for i, ch in enumerate(text[:300]):
        out.append(ch)
        if i % 3 == 2:
            out.append(rng.choice("★☆◆◇■□▲△●○※→←↑↓♪♫#@%&*"))
    return "".join(out)


def _repeated_lines(text: str, rng: random.Random) -> str:
    line = "欢迎光临本店，全场商品八折优惠！"
    return "\n".join([text[:60]] + [line] * 12)


def _latin_spam(text: str, rng: random.Random) -> str:
    words = ["cheap", "pills", "casino", "bonus", "free", "click", "win", "money", "online"]
    return text[:150] + " ".join(rng.choice(words) for _ in range(25))


def _control_chars(text: str, rng: random.Random) -> str:
    chars = list(text[:400])
    for _ in range(len(chars) // 10):
        chars.insert(rng.randrange(len(chars)), chr(rng.choice([0, 1, 2, 7, 0x1B, 0xFFFD])))
    return "".join(chars)


def _ngram_repeat(text: str, rng: random.Random) -> str:
    return text[:80] + "哈哈哈哈哈" * 60


def _too_short(text: str, rng: random.Random) -> str:
    return text[:20]


def _digits(text: str, rng: random.Random) -> str:
    return "\n".join(
        f"商品编号{rng.randrange(10**6)}价格{rng.randrange(10**4)}元" for _ in range(20)
    )


# name -> (maker(text, rng) -> junk, expected outcome: a filter reason, or "boilerplate" when
# the document must be kept with its boilerplate lines deleted)
JUNK = {
    "boilerplate": (_boilerplate_wrapped, "boilerplate"),
    "symbol-soup": (_symbol_soup, "symbols"),
    "repeated-lines": (_repeated_lines, "dup-lines"),
    "latin-spam": (_latin_spam, "latin"),
    "control-chars": (_control_chars, "invalid-chars"),
    "ngram-repeat": (_ngram_repeat, "top-ngram"),
    "too-short": (_too_short, "length"),
    "digits": (_digits, "digits"),
}
