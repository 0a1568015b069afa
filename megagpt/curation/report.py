"""What ``megagpt clean`` removed and kept: counters per filter with examples, as JSON and text.

A :class:`Report` is filled per work unit in the workers, merged in unit order in the main
process (so its examples are the first ones in input order, whatever ``--workers``) and saved
in every journal line, so a resumed run reports the same figures as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from megagpt.curation.filters import FILTER_REASONS, CleanResult

DEDUP_REASONS = ("exact-duplicate", "near-duplicate")
_SNIPPET = 120

_FILTER_DOC = {
    "invalid-chars": "too many control / format / private-use characters or U+FFFD",
    "length": "too few or too many characters",
    "cjk": "too small a share of CJK ideographs",
    "symbols": "too large a share of symbols",
    "digits": "too large a share of digits",
    "latin": "too large a share of Latin letters",
    "dup-lines": "too many repeated lines",
    "dup-line-chars": "too many characters in repeated lines",
    "top-ngram": "one character n-gram covers too much of the text",
    "dup-ngram": "too many characters inside repeated character n-grams",
    "exact-duplicate": "same normalised text as an earlier kept document",
    "near-duplicate": "MinHash-estimated Jaccard >= threshold with an earlier kept document",
}


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "…"


class Report:
    """Counters of one clean (or of one work unit); ``examples`` per reason are kept."""

    def __init__(self, examples: int = 3) -> None:
        self.max_examples = examples
        self.records = 0
        self.input_bytes = 0
        self.input_chars = 0
        self.bad: Counter = Counter()
        self.bad_examples: list[str] = []
        self.removed = {r: [0, 0] for r in FILTER_REASONS + DEDUP_REASONS}  # [docs, chars]
        self.examples: dict[str, list] = {r: [] for r in self.removed}
        self.boilerplate = [0, 0, 0]  # lines, characters, documents
        self.boilerplate_examples: list = []
        self.invalid_chars = 0
        self.invalid_docs = 0
        self.normalized_docs = 0
        self.output_docs = 0
        self.output_chars = 0
        self.extra: dict = {}

    # -- filling -------------------------------------------------------------------------
    def add_bad(self, exc) -> None:
        self.bad[exc.reason] += 1
        if len(self.bad_examples) < self.max_examples:
            self.bad_examples.append(f"{exc.path}:{exc.line}: {exc.detail}")

    def add_clean(self, doc_id: str, doc: str, result: CleanResult) -> None:
        """Count what the cleaner did to one parsed document."""
        self.input_chars += len(doc)
        if result.invalid_chars:
            self.invalid_chars += result.invalid_chars
            self.invalid_docs += 1
        self.normalized_docs += result.normalized
        if result.boilerplate_lines:
            self.boilerplate[0] += len(result.boilerplate_lines)
            self.boilerplate[1] += sum(len(x) for x in result.boilerplate_lines)
            self.boilerplate[2] += 1
            for line in result.boilerplate_lines:
                if len(self.boilerplate_examples) < self.max_examples:
                    self.boilerplate_examples.append({"id": doc_id, "line": _snippet(line)})
        if result.reason is not None:
            self._remove(result.reason, doc_id, doc)

    def _remove(self, reason: str, doc_id: str, text: str, **extra) -> None:
        self.removed[reason][0] += 1
        self.removed[reason][1] += len(text)
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append({"id": doc_id, **extra, "text": _snippet(text)})

    def add_duplicate(self, kind: str, doc_id: str, kept_id: str, text: str) -> None:
        self._remove(f"{kind}-duplicate", doc_id, text, kept=kept_id)

    def add_output(self, text: str) -> None:
        self.output_docs += 1
        self.output_chars += len(text)

    def merge(self, other: Report) -> None:
        """Add the counters of ``other`` (a later work unit)."""
        self.records += other.records
        self.input_bytes += other.input_bytes
        self.input_chars += other.input_chars
        self.bad.update(other.bad)
        self.bad_examples.extend(other.bad_examples[: self.max_examples - len(self.bad_examples)])
        for reason, (docs, chars) in other.removed.items():
            self.removed[reason][0] += docs
            self.removed[reason][1] += chars
            room = self.max_examples - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][: max(room, 0)])
        for i in range(3):
            self.boilerplate[i] += other.boilerplate[i]
        room = self.max_examples - len(self.boilerplate_examples)
        self.boilerplate_examples.extend(other.boilerplate_examples[: max(room, 0)])
        self.invalid_chars += other.invalid_chars
        self.invalid_docs += other.invalid_docs
        self.normalized_docs += other.normalized_docs
        self.output_docs += other.output_docs
        self.output_chars += other.output_chars

    # -- persistence (journal) -----------------------------------------------------------
    _FIELDS = (
        "records",
        "input_bytes",
        "input_chars",
        "bad_examples",
        "removed",
        "examples",
        "boilerplate",
        "boilerplate_examples",
        "invalid_chars",
        "invalid_docs",
        "normalized_docs",
        "output_docs",
        "output_chars",
    )

    def state(self) -> dict:
        """Plain data for the journal."""
        out = {k: getattr(self, k) for k in self._FIELDS}
        out["bad"] = dict(self.bad)
        return out

    def load_state(self, state: dict) -> None:
        for k in self._FIELDS:
            setattr(self, k, state[k])
        self.bad = Counter(state["bad"])

    # -- output --------------------------------------------------------------------------
    def finish(self, **extra) -> None:
        """Attach run facts (inputs, config, shards, index, timing) for the written report."""
        self.extra = extra

    def to_json(self) -> dict:
        """The report as written to ``report.json``; everything but ``timing`` is the same for
        any worker count and across a resume."""
        filters = {}
        for reason, (docs, chars) in self.removed.items():
            filters[reason] = {
                "documents": docs,
                "characters": chars,
                "what": _FILTER_DOC[reason],
                "examples": self.examples[reason],
            }
        return {
            "inputs": self.extra.get("inputs", []),
            "documents": {
                "records": self.records,
                "bad_skipped": sum(self.bad.values()),
                "removed": sum(d for d, _ in self.removed.values()),
                "written": self.output_docs,
            },
            "characters": {"input": self.input_chars, "written": self.output_chars},
            "input_bytes": self.input_bytes,
            "bad_records": {
                "counts": dict(sorted(self.bad.items())),
                "examples": self.bad_examples,
            },
            "filters": filters,
            "lines": {
                "boilerplate": {
                    "lines": self.boilerplate[0],
                    "characters": self.boilerplate[1],
                    "documents": self.boilerplate[2],
                    "examples": self.boilerplate_examples,
                }
            },
            "characters_deleted": {"invalid": self.invalid_chars, "documents": self.invalid_docs},
            "normalized_documents": self.normalized_docs,
            "shards": self.extra.get("shards", []),
            "dedup_index": self.extra.get("index", {}),
            "config": self.extra.get("config", {}),
            "timing": self.extra.get("timing", {}),
        }

    def to_markdown(self) -> str:
        """A readable summary (``report.md``)."""
        j = self.to_json()
        d, c = j["documents"], j["characters"]
        out = [
            "# megagpt clean report",
            "",
            f"- inputs: {', '.join(j['inputs'])}",
            f"- records {d['records']:,}; bad skipped {d['bad_skipped']:,}; removed "
            f"{d['removed']:,}; written {d['written']:,} in {len(j['shards'])} shard(s)",
            f"- characters: input {c['input']:,}, written {c['written']:,} "
            f"({c['written'] / max(c['input'], 1):.1%})",
            f"- invalid characters deleted: {self.invalid_chars:,} in "
            f"{self.invalid_docs:,} documents; documents changed by normalisation: "
            f"{self.normalized_docs:,}",
            f"- boilerplate lines deleted: {self.boilerplate[0]:,} ({self.boilerplate[1]:,} "
            f"characters) in {self.boilerplate[2]:,} documents",
            "",
        ]
        if self.bad:
            out += [
                "bad records: " + ", ".join(f"{k} {v}" for k, v in sorted(self.bad.items())),
                "",
            ]
        out += ["| removed by | documents | characters | what |", "|---|---:|---:|---|"]
        for reason, f in j["filters"].items():
            out.append(f"| {reason} | {f['documents']:,} | {f['characters']:,} | {f['what']} |")
        out += ["", "## Examples", ""]
        for reason, f in j["filters"].items():
            for ex in f["examples"]:
                kept = f" (duplicate of {ex['kept']})" if "kept" in ex else ""
                out.append(f"- **{reason}** `{ex['id']}`{kept}: {ex['text']}")
        for ex in self.boilerplate_examples:
            out.append(f"- **boilerplate line** `{ex['id']}`: {ex['line']}")
        t = j["timing"]
        if t:
            out += [
                "",
                f"time {t['seconds']}s with {t['workers']} worker(s): "
                f"{t['documents_per_s']:,} documents/s, {t['mb_per_s']} MB/s (this session)",
            ]
        return "\n".join(out) + "\n"


def write_report(report: Report, out_dir: str) -> None:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (atomically each)."""
    for name, text in (
        ("report.json", json.dumps(report.to_json(), ensure_ascii=False, indent=1) + "\n"),
        ("report.md", report.to_markdown()),
    ):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
