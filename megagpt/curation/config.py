"""The configuration of ``megagpt clean``: typed sections, defaults, strict YAML loading.

Every field carries a one-line doc (``metadata["doc"]``); ``megagpt clean --print-config``
renders the defaults as a commented YAML file, which is the reference of the keys. Unknown keys
and wrong types are errors naming the key and where it came from (the YAML file or ``--set``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from megagpt.data.errors import DataError


def _f(default: Any, doc: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


# Short lines of page furniture that carry no content: navigation, copyright, share/cookie
# prompts. Matched anywhere in a line no longer than ``boilerplate_max_line_chars``.
DEFAULT_BOILERPLATE = [
    r"版权所有",
    r"[Cc]opyright|©|\(c\)\s*\d{4}|[Aa]ll [Rr]ights [Rr]eserved",
    r"点击(这里|此处|查看|进入|下载|阅读|关注|购买|播放|咨询|订阅)",
    r"^(上一篇|下一篇|上一页|下一页|返回(首页|顶部|列表|上一页)|首页)\s*[:：>›»]?",
    r"(当前位置|您的位置|你的位置)\s*[:：]",
    r"分享到|扫一扫|扫码关注|关注(我们|公众号|微信)|微信公众号",
    r"[Cc]ookies?",
    r"ICP[备证]|京公网安备|网安备\d",
    r"(相关|推荐|热门|延伸)阅读|猜你喜欢|相关文章|热门文章",
    r"责任编辑|免责声明|联系我们|关于我们|网站地图|意见反馈",
    r"(登录|注册)\s*[|｜/]\s*(注册|登录)|立即(登录|注册|下载)",
    r"本文(来源|转载自|转自)|原文链接|转载请注明",
]


@dataclass
class NormalizeConfig:
    """Character-level clean-up applied to every document before the filters."""

    unicode_form: str = _f("NFKC", "Unicode normalisation: NFKC, NFC or none")
    halfwidth_punctuation: bool = _f(
        False,
        "also map full-width punctuation (，！？：；（）) to ASCII; NFKC does this by "
        "itself, so by default those characters are kept as written",
    )
    traditional_to_simplified: bool = _f(
        False,
        "convert traditional to simplified characters with OpenCC t2s "
        '(needs pip install -e ".[data]")',
    )
    max_invalid_fraction: float = _f(
        0.01,
        "drop a document whose share of control / format / private-use characters and "
        "U+FFFD exceeds this; below it they are deleted",
    )


@dataclass
class FilterConfig:
    """Document filters, all counted over characters (Chinese has no whitespace words).

    Shares are of the document's non-whitespace characters. A value of 0 (minimums) or 1
    (maximums) turns a filter off. The first filter a document fails is the one counted.
    """

    min_chars: int = _f(50, "drop documents with fewer non-whitespace characters")
    max_chars: int = _f(1_000_000, "drop documents with more non-whitespace characters")
    min_cjk_fraction: float = _f(0.3, "drop documents whose share of CJK ideographs is lower")
    max_symbol_fraction: float = _f(
        0.1, "drop documents whose share of symbols (Unicode S*, and #*@&%_\\|~^) is higher"
    )
    max_digit_fraction: float = _f(0.25, "drop documents whose share of digits 0-9 is higher")
    max_latin_fraction: float = _f(0.4, "drop documents whose share of Latin letters is higher")
    max_dup_line_fraction: float = _f(
        0.3, "Gopher: drop if the share of non-blank lines repeating an earlier line is higher"
    )
    max_dup_line_char_fraction: float = _f(
        0.2, "Gopher: drop if the share of characters in repeated lines is higher"
    )
    top_ngram: dict = _f(
        {2: 0.3, 3: 0.25, 4: 0.25},
        "Gopher top n-gram share over characters: {n: limit}; drop if the most frequent "
        "character n-gram covers more than the limit of the characters (highest on the shared "
        "wiki/laws corpora: 0.22/0.16/0.22)",
    )
    dup_ngram: dict = _f(
        {10: 0.8, 20: 0.7},
        "Gopher duplicate n-gram share over characters: {n: limit}; drop if the characters "
        "covered by character n-grams occurring more than once exceed the limit (legal text "
        "repeats phrases: highest on the shared laws corpus 0.70/0.58)",
    )
    boilerplate_patterns: list = _f(
        DEFAULT_BOILERPLATE, "regular expressions (Python re) of boilerplate lines to delete"
    )
    boilerplate_max_line_chars: int = _f(
        80, "only lines this short (non-whitespace characters) are boilerplate candidates"
    )


@dataclass
class DedupConfig:
    """Exact (normalised-text hash) and near-duplicate (MinHash + LSH) removal."""

    exact: bool = _f(True, "drop documents whose normalised text equals an earlier kept one")
    near: bool = _f(True, "drop near-duplicates of earlier kept documents (MinHash + LSH)")
    threshold: float = _f(
        0.8,
        "estimated Jaccard similarity of character shingles at which a document is a "
        "near-duplicate",
    )
    shingle_chars: int = _f(5, "shingle size in characters (letters, digits, CJK only)")
    num_perm: int = _f(128, "MinHash permutations (signature length; 4 bytes each per doc)")
    seed: int = _f(1, "MinHash seed; the same seed gives the same output")
    backend: str = _f(
        "numpy",
        "signature backend: numpy (ours; chosen by measurement, BENCHMARKS-clean.md) or datasketch",
    )


@dataclass
class OutputConfig:
    """How the kept documents are written."""

    text_key: str = _f("text", "jsonl key of the document text in the output shards")
    source_key: str = _f("source", "jsonl key of the input file:line; empty to leave it out")
    shard_bytes: int = _f(256 << 20, "start a new part-NNNNN.jsonl after this many bytes")
    chunk_docs: int = _f(256, "documents per work unit sent to a worker")
    commit_chunks: int = _f(
        16, "make progress durable (the resume point) every this many work units"
    )
    examples: int = _f(3, "examples per filter kept in the report")


@dataclass
class CleanConfig:
    """Everything ``megagpt clean`` does besides inputs and output directory."""

    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def to_dict(cfg: CleanConfig) -> dict:
    """The config as plain data (for the report and the resume manifest)."""
    return dataclasses.asdict(cfg)


def _check(section: str, name: str, value: Any, default: Any, where: str) -> Any:
    key = f"{section}.{name}"

    def bad(expected: str) -> DataError:
        return DataError(f"{where}: key '{key}' must be {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
    elif isinstance(default, dict):
        if not isinstance(value, dict):
            raise bad("a mapping {n: limit}")
        try:
            value = {int(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise bad("a mapping of integer n to a number") from None
        if any(k < 1 for k in value):
            raise bad("a mapping with n >= 1")
    return value


def _apply(cfg: CleanConfig, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if len(parts) != 2 or parts[0] not in sections:
        close = difflib.get_close_matches(parts[0], sections, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"{where}: unknown key '{key}'{hint}; sections: {', '.join(sections)}")
    obj = sections[parts[0]]
    names = [f.name for f in dataclasses.fields(obj)]
    if parts[1] not in names:
        close = difflib.get_close_matches(parts[1], names, n=1)
        hint = f" (did you mean '{parts[0]}.{close[0]}'?)" if close else ""
        raise DataError(f"{where}: unknown key '{key}'{hint}")
    setattr(obj, parts[1], _check(parts[0], parts[1], value, getattr(obj, parts[1]), where))


def validate(cfg: CleanConfig, where: str = "config") -> None:
    """Range checks that need more than a type; raise :class:`DataError` naming the key."""
    import re

    def bad(key: str, msg: str) -> DataError:
        return DataError(f"{where}: key '{key}' {msg}")

    if cfg.normalize.unicode_form.upper() not in ("NFKC", "NFC", "NONE"):
        raise bad(
            "normalize.unicode_form",
            f"must be NFKC, NFC or none, got {cfg.normalize.unicode_form!r}",
        )
    f = cfg.filters
    for name in (
        "min_cjk_fraction",
        "max_symbol_fraction",
        "max_digit_fraction",
        "max_latin_fraction",
        "max_dup_line_fraction",
        "max_dup_line_char_fraction",
    ):
        if not 0.0 <= getattr(f, name) <= 1.0:
            raise bad(f"filters.{name}", f"must be within [0, 1], got {getattr(f, name)}")
    if not 0.0 <= cfg.normalize.max_invalid_fraction <= 1.0:
        raise bad("normalize.max_invalid_fraction", "must be within [0, 1]")
    for name in ("top_ngram", "dup_ngram"):
        for n, limit in getattr(f, name).items():
            if not 0.0 <= limit <= 1.0:
                raise bad(f"filters.{name}.{n}", f"must be within [0, 1], got {limit}")
    if f.min_chars < 0 or f.max_chars < f.min_chars:
        raise bad("filters.max_chars", f"must be >= filters.min_chars ({f.min_chars}) >= 0")
    for i, pattern in enumerate(f.boilerplate_patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise bad(f"filters.boilerplate_patterns[{i}]", f"is not a regex: {exc}") from None
    d = cfg.dedup
    if not 0.0 < d.threshold <= 1.0:
        raise bad("dedup.threshold", f"must be within (0, 1], got {d.threshold}")
    if d.shingle_chars < 1:
        raise bad("dedup.shingle_chars", "must be >= 1")
    if d.num_perm < 2:
        raise bad("dedup.num_perm", "must be >= 2")
    if d.backend not in ("numpy", "datasketch"):
        raise bad("dedup.backend", f"must be numpy or datasketch, got {d.backend!r}")
    o = cfg.output
    for name in ("shard_bytes", "chunk_docs", "commit_chunks"):
        if getattr(o, name) < 1:
            raise bad(f"output.{name}", "must be >= 1")
    if not o.text_key:
        raise bad("output.text_key", "must not be empty")
    if o.text_key == o.source_key:
        raise bad("output.source_key", "must differ from output.text_key")


def load_clean_config(path: str | None = None, overrides: list[str] | None = None) -> CleanConfig:
    """Defaults, then the YAML file ``path`` (sections as in ``--print-config``), then
    ``overrides`` (``section.key=value``, YAML values). Raises :class:`DataError`."""
    import yaml

    cfg = CleanConfig()
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise DataError(f"{path}: config file does not exist") from None
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a mapping of sections")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise DataError(f"{path}: section '{section}' must be a mapping")
            for name, value in values.items():
                _apply(cfg, f"{section}.{name}", value, path)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise DataError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _apply(cfg, key.strip(), value, "--set")
    validate(cfg, path or "--set")
    return cfg


def render_yaml(cfg: CleanConfig | None = None) -> str:
    """The config as YAML with each field's doc as a comment (``--print-config``)."""
    import json

    cfg = cfg or CleanConfig()
    out = [
        "# megagpt clean configuration (defaults). Pass with --config FILE;",
        "# override single keys with --set section.key=value.",
    ]
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        out.append("")
        out.append(f"{sec.name}:  # {type(obj).__doc__.splitlines()[0]}")
        for fld in dataclasses.fields(obj):
            value = getattr(obj, fld.name)
            out.append(f"  # {fld.metadata['doc']}")
            if isinstance(value, list):
                out.append(f"  {fld.name}:")
                out.extend(f"    - {json.dumps(v, ensure_ascii=False)}" for v in value)
            else:
                out.append(f"  {fld.name}: {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(out) + "\n"
