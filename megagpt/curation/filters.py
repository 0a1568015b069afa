"""Character-based cleaning of Chinese documents: normalisation, boilerplate lines, filters.

Everything is measured in characters, never whitespace-separated words (Chinese has none):
shares are of a document's non-whitespace characters, the Gopher repetition signals (duplicate
lines, top n-gram share, duplicate n-gram share; Rae et al. 2021, appendix A) are computed over
character n-grams. :class:`Cleaner` applies, in this order:

1. invalid characters: control / format / private-use characters and U+FFFD are deleted, or the
   document dropped (``invalid-chars``) when they exceed ``normalize.max_invalid_fraction``;
2. Unicode normalisation (NFKC by default, keeping full-width punctuation unless asked),
   optional traditional -> simplified;
3. boilerplate lines deleted (navigation, copyright, share/cookie prompts);
4. document filters; the first failing one is the reason counted: ``length``, ``cjk``,
   ``symbols``, ``digits``, ``latin``, ``dup-lines``, ``dup-line-chars``, ``top-ngram``,
   ``dup-ngram``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from megagpt.curation.config import FilterConfig, NormalizeConfig

FILTER_REASONS = (
    "invalid-chars",
    "length",
    "cjk",
    "symbols",
    "digits",
    "latin",
    "dup-lines",
    "dup-line-chars",
    "top-ngram",
    "dup-ngram",
)

# C0/C1 controls except \t and \n; zero-width and bidi format characters; BOM; private use
# (BMP and planes 15-16); non-characters. \r is handled before (\r\n and \r become \n).
_INVALID_RE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f"
    "\ufeff\ufff9-\ufffb\ufffe\uffff\ue000-\uf8ff\U000f0000-\U0010ffff\ufffd]"
)
# Full-width punctuation NFKC would fold to ASCII; Chinese text writes these on purpose.
_FW_PUNCT = "".join(chr(c) for c in range(0xFF01, 0xFF5F) if not chr(c).isalnum())
# Stand-ins from the supplementary private use area: deleted in step 1, so free to borrow.
_PROTECT = {ord(c): 0xF0000 + i for i, c in enumerate(_FW_PUNCT)}
_UNPROTECT = {v: k for k, v in _PROTECT.items()}
_WHITESPACE = np.array([9, 10, 11, 12, 13, 32, 0xA0, 0x3000], dtype=np.uint32)


def codepoints(text: str) -> np.ndarray:
    """The text as a uint32 array of code points (no copy beyond the UTF-32 encoding)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _is_cjk(cp: np.ndarray) -> np.ndarray:
    return (
        ((cp >= 0x4E00) & (cp <= 0x9FFF))
        | ((cp >= 0x3400) & (cp <= 0x4DBF))
        | ((cp >= 0x20000) & (cp <= 0x323AF))
        | ((cp >= 0xF900) & (cp <= 0xFAFF))
    )


_SYMBOL_TABLE: np.ndarray | None = None


def _symbol_table() -> np.ndarray:
    """Boolean lookup over the BMP: Unicode symbols (S*) plus ASCII soup characters."""
    global _SYMBOL_TABLE  # built once per process (~0.1 s), shared by forked workers
    if _SYMBOL_TABLE is None:
        table = np.zeros(0x10000, dtype=bool)
        for c in range(0x10000):
            if unicodedata.category(chr(c))[0] == "S":
                table[c] = True
        for ch in "#*@&%_\\|~^":
            table[ord(ch)] = True
        _SYMBOL_TABLE = table
    return _SYMBOL_TABLE


@dataclass
class Shares:
    """Character composition of a document (over non-whitespace characters)."""

    chars: int
    cjk: float
    symbols: float
    digits: float
    latin: float


def shares(text: str) -> Shares:
    """Non-whitespace character count and the CJK / symbol / digit / Latin shares."""
    cp = codepoints(text)
    cp = cp[~np.isin(cp, _WHITESPACE)]
    n = len(cp)
    if n == 0:
        return Shares(0, 0.0, 0.0, 0.0, 0.0)
    bmp = cp[cp < 0x10000]
    symbols = int(_symbol_table()[bmp].sum()) + int(((cp >= 0x1F000) & (cp < 0x1FB00)).sum())
    latin = (
        ((cp >= 0x41) & (cp <= 0x5A))
        | ((cp >= 0x61) & (cp <= 0x7A))
        | ((cp >= 0xC0) & (cp <= 0x24F) & (cp != 0xD7) & (cp != 0xF7))
    )
    return Shares(
        n,
        float(_is_cjk(cp).sum()) / n,
        symbols / n,
        float(((cp >= 0x30) & (cp <= 0x39)).sum()) / n,
        float(latin.sum()) / n,
    )


def ngram_hashes(cp: np.ndarray, n: int) -> np.ndarray:
    """uint64 hashes of every character n-gram of ``cp`` (len - n + 1 of them, or none).

    A polynomial over the code points, then a splitmix64 finaliser so that the high bits,
    which the MinHash permutations read, depend on every character.
    """
    count = len(cp) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    wide = cp.astype(np.uint64)
    for k in range(n):  # wrapping uint64 arithmetic is the intended modulus 2**64
        h = h * np.uint64(0x100000001B3) + wide[k : k + count]
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def top_ngram_share(cp: np.ndarray, n: int) -> float:
    """Share of characters covered by the most frequent character n-gram (Gopher)."""
    h = ngram_hashes(cp, n)
    if len(h) == 0:
        return 0.0
    _, counts = np.unique(h, return_counts=True)
    top = int(counts.max())
    if top < 2:
        return 0.0
    return min(1.0, top * n / len(cp))


def dup_ngram_share(cp: np.ndarray, n: int) -> float:
    """Share of characters inside some n-gram that occurs more than once (Gopher)."""
    h = ngram_hashes(cp, n)
    if len(h) == 0:
        return 0.0
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    if len(starts) == 0:
        return 0.0
    # +1 at each start, -1 after its end; a character is covered where the running sum is > 0
    size = len(cp) + 1
    cover = np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size)
    return float((np.cumsum(cover[:-1]) > 0).sum()) / len(cp)


def dup_line_stats(text: str) -> tuple[float, float]:
    """(share of non-blank lines repeating an earlier line, share of their characters)."""
    seen: set[str] = set()
    lines = dup_lines = chars = dup_chars = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        lines += 1
        chars += len(line)
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    if lines == 0:
        return 0.0, 0.0
    return dup_lines / lines, dup_chars / chars


@dataclass
class CleanResult:
    """What :meth:`Cleaner.clean` did to one document."""

    text: str | None  # None: dropped
    reason: str | None = None  # the filter that dropped it
    invalid_chars: int = 0  # characters deleted in step 1
    normalized: bool = False  # step 2 changed the text
    boilerplate_lines: list[str] = field(default_factory=list)  # deleted in step 3


class Cleaner:
    """Normalisation and filters built once from their config sections; ``clean`` per document.

    Args:
        norm: the ``normalize`` section.
        filters: the ``filters`` section.
    """

    def __init__(self, norm: NormalizeConfig, filters: FilterConfig) -> None:
        self.norm = norm
        self.cfg = filters
        self.form = norm.unicode_form.upper()
        self.boilerplate = (
            re.compile("|".join(f"(?:{p})" for p in filters.boilerplate_patterns))
            if filters.boilerplate_patterns
            else None
        )
        self._t2s = None
        if norm.traditional_to_simplified:
            try:
                from opencc import OpenCC
            except ImportError as exc:
                from megagpt.data.errors import DataError

                raise DataError(
                    "normalize.traditional_to_simplified needs opencc-python-reimplemented: "
                    'pip install -e ".[data]"'
                ) from exc
            self._t2s = OpenCC("t2s")
        _symbol_table()

    def normalize(self, text: str) -> str:
        """Step 2: Unicode normalisation and optional traditional -> simplified."""
        if self.form != "NONE":
            if not self.norm.halfwidth_punctuation and self.form == "NFKC":
                text = text.translate(_PROTECT)
                text = unicodedata.normalize("NFKC", text).translate(_UNPROTECT)
            else:
                text = unicodedata.normalize(self.form, text)
        if self._t2s is not None:
            text = self._t2s.convert(text)
        return text

    def clean(self, text: str) -> CleanResult:
        """Run steps 1-4 on one document."""
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        stripped, invalid = _INVALID_RE.subn("", text)
        if invalid and invalid > self.norm.max_invalid_fraction * max(len(text), 1):
            return CleanResult(None, "invalid-chars", invalid)
        result = CleanResult(None, invalid_chars=invalid)
        normalized = self.normalize(stripped)
        result.normalized = normalized != stripped
        text = normalized
        if self.boilerplate is not None:
            text = self._drop_boilerplate(text, result.boilerplate_lines)
        result.reason = self.check(text)
        if result.reason is None:
            result.text = text
        return result

    def _drop_boilerplate(self, text: str, removed: list[str]) -> str:
        limit = self.cfg.boilerplate_max_line_chars
        kept = []
        for line in text.split("\n"):
            core = line.strip()
            if core and len(core) <= limit and self.boilerplate.search(core):
                removed.append(line)
            else:
                kept.append(line)
        return "\n".join(kept).strip("\n") if removed else text

    def check(self, text: str) -> str | None:
        """Step 4: the name of the first document filter ``text`` fails, or None."""
        c = self.cfg
        s = shares(text)
        if s.chars < c.min_chars or s.chars > c.max_chars:
            return "length"
        if s.cjk < c.min_cjk_fraction:
            return "cjk"
        if s.symbols > c.max_symbol_fraction:
            return "symbols"
        if s.digits > c.max_digit_fraction:
            return "digits"
        if s.latin > c.max_latin_fraction:
            return "latin"
        lines, line_chars = dup_line_stats(text)
        if lines > c.max_dup_line_fraction:
            return "dup-lines"
        if line_chars > c.max_dup_line_char_fraction:
            return "dup-line-chars"
        if c.top_ngram or c.dup_ngram:
            cp = codepoints(text)
            cp = cp[~np.isin(cp, _WHITESPACE)]
            for n, limit in sorted(c.top_ngram.items()):
                if limit < 1.0 and top_ngram_share(cp, n) > limit:
                    return "top-ngram"
            for n, limit in sorted(c.dup_ngram.items()):
                if limit < 1.0 and dup_ngram_share(cp, n) > limit:
                    return "dup-ngram"
        return None
