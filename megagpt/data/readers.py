"""Reading documents from jsonl, plain text and csv files (optionally ``.gz``).

Reading is split in two so that preprocessing can parallelise the expensive half:

* :func:`iter_raw_records` only cuts the input into records (a jsonl line, a text line or
  paragraph, a csv field) with their 1-based line numbers; for inputs with one record per line,
  :func:`iter_byte_ranges` and :func:`iter_range_records` let each worker cut its own part of
  the file, so that no single process reads everything;
* :func:`parse_record` runs in the workers: UTF-8 decoding, JSON parsing, key lookup and
  validation. A record that cannot be used raises :class:`BadRecordError` naming file:line.

Blank lines of a jsonl file are ignored (they hold no document); every other problem is a
bad record.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass

from megagpt.data.errors import BadRecordError, DataError

FORMATS = ("jsonl", "text", "csv")
_SUFFIX_FORMAT = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
}

# Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the text.
_BOM = b"\xef\xbb\xbf"

# csv's default field limit (128 KiB) is smaller than many documents.
csv.field_size_limit(2**31 - 1)


@dataclass(frozen=True)
class InputSpec:
    """One input file and how to read documents from it.

    Attributes:
        path: the file; a ``.gz`` suffix means gzip-compressed.
        fmt: ``jsonl`` (one JSON object per line), ``text`` or ``csv`` (with a header row).
        json_key: the jsonl key holding the document text.
        csv_column: the csv column holding the document text.
        paragraphs: text only: documents are separated by blank lines instead of one per line.
    """

    path: str
    fmt: str
    json_key: str = "text"
    csv_column: str = "text"
    paragraphs: bool = False


def make_input_spec(
    path: str,
    fmt: str = "auto",
    json_key: str = "text",
    csv_column: str = "text",
    paragraphs: bool = False,
) -> InputSpec:
    """Check that ``path`` exists and resolve ``fmt="auto"`` from its suffix (``.gz`` ignored)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: input file does not exist")
    if fmt == "auto":
        stem = path.removesuffix(".gz")
        fmt = _SUFFIX_FORMAT.get(os.path.splitext(stem)[1].lower(), "")
        if not fmt:
            raise DataError(
                f"{path}: cannot tell the input format from the file name; use a .jsonl/.txt/.csv "
                "suffix (optionally .gz) or pass --input-format"
            )
    if fmt not in FORMATS:
        raise DataError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return InputSpec(path, fmt, json_key, csv_column, paragraphs)


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_raw_records(spec: InputSpec) -> Iterator[tuple[int, bytes | str | None]]:
    """Yield ``(line_number, raw)`` for every record of ``spec`` in file order.

    ``raw`` is undecoded bytes for jsonl and text, the field's text for csv (undecodable bytes
    kept as surrogate escapes so the worker can report them), ``None`` for a csv row that lacks
    the column. Damaged files (bad gzip stream, csv syntax) raise :class:`DataError`.
    """
    try:
        if spec.fmt == "csv":
            yield from _iter_csv(spec)
        elif spec.fmt == "text" and spec.paragraphs:
            yield from _iter_paragraphs(spec)
        else:
            skip_blank = spec.fmt == "jsonl"
            with _open_binary(spec.path) as f:
                for number, line in enumerate(f, 1):
                    line = line.rstrip(b"\r\n")
                    if number == 1:
                        line = line.removeprefix(_BOM)
                    if skip_blank and not line.strip():
                        continue
                    yield number, line
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{spec.path}: cannot read file ({exc})") from exc


def can_split(spec: InputSpec) -> bool:
    """Whether workers can read ``spec`` in byte ranges (:func:`iter_byte_ranges`): one record
    per line of an uncompressed file. Not gzip (no random access), csv (quoted fields span
    lines) or blank-line-separated text (a range could start inside a paragraph)."""
    return spec.fmt in ("jsonl", "text") and not spec.paragraphs and not spec.path.endswith(".gz")


def iter_byte_ranges(spec: InputSpec, target_bytes: int) -> Iterator[tuple[int, int]]:
    """Cut a :func:`can_split` input into ``[start, end)`` byte ranges of about
    ``target_bytes`` that each start at the beginning of a line, lazily (constant memory).

    Only a few bytes around each cut are read: a line that crosses ``start + target_bytes``
    ends the range.
    """
    size = os.path.getsize(spec.path)
    start = 0
    try:
        with open(spec.path, "rb") as f:
            while start < size:
                cut = start + max(1, target_bytes)
                if cut >= size:
                    end = size
                else:
                    f.seek(cut - 1)
                    f.readline()  # to the end of the line holding byte cut - 1
                    end = f.tell()
                yield start, end
                start = end
    except OSError as exc:
        raise DataError(f"{spec.path}: cannot read file ({exc})") from exc


def iter_range_records(
    spec: InputSpec, start: int, end: int
) -> Generator[tuple[int, bytes], None, int]:
    """Yield ``(line, raw)`` for the records of bytes ``[start, end)`` of a :func:`can_split`
    input, as :func:`iter_raw_records` would, except that ``line`` counts from 1 at ``start``.

    ``start`` and ``end`` must be line starts (from :func:`iter_byte_ranges`). The caller turns
    ``line`` into a file line number by adding the lines of the earlier ranges: the generator
    returns (``StopIteration.value``) the number of lines in the range, blank ones included.
    """
    skip_blank = spec.fmt == "jsonl"
    try:
        with open(spec.path, "rb") as f:
            f.seek(start)
            pos = start
            number = 0
            for line in f:
                if pos >= end:
                    break
                pos += len(line)
                number += 1
                line = line.rstrip(b"\r\n")
                if start == 0 and number == 1:
                    line = line.removeprefix(_BOM)
                if skip_blank and not line.strip():
                    continue
                yield number, line
    except OSError as exc:
        raise DataError(f"{spec.path}: cannot read file ({exc})") from exc
    return number


def _iter_paragraphs(spec: InputSpec) -> Iterator[tuple[int, bytes]]:
    lines: list[bytes] = []
    first = 0
    with _open_binary(spec.path) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if number == 1:
                line = line.removeprefix(_BOM)
            if line.strip():
                if not lines:
                    first = number
                lines.append(line)
            elif lines:
                yield first, b"\n".join(lines)
                lines = []
    if lines:
        yield first, b"\n".join(lines)


def _iter_csv(spec: InputSpec) -> Iterator[tuple[int, str | None]]:
    with _open_binary(spec.path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{spec.path}:1: empty csv file (a header row is required)")
            if spec.csv_column not in header:
                raise DataError(
                    f"{spec.path}:1: csv header has no column {spec.csv_column!r} "
                    f"(columns: {', '.join(header)}); pass --csv-column"
                )
            column = header.index(spec.csv_column)
            start = reader.line_num + 1
            for row in reader:
                if row:  # csv.reader yields [] for a blank line: no record there
                    yield start, row[column] if column < len(row) else None
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"{spec.path}:{reader.line_num}: malformed csv ({exc})") from exc


def _decode(spec: InputSpec, line: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line += raw.count(b"\n", 0, exc.start)  # paragraphs span several lines
        raise BadRecordError(
            spec.path,
            line,
            "invalid-utf8",
            f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start})",
        ) from None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_record(spec: InputSpec, line: int, raw: bytes | str | None) -> str:
    """Turn one raw record into document text, or raise :class:`BadRecordError`."""
    if spec.fmt == "jsonl":
        text = _decode(spec, line, raw)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRecordError(
                spec.path,
                line,
                "malformed-json",
                f"malformed JSON ({exc.msg} at column {exc.colno})",
            ) from None
        if not isinstance(obj, dict):
            raise BadRecordError(
                spec.path,
                line,
                "malformed-json",
                f"expected a JSON object, got {type(obj).__name__}",
            )
        if spec.json_key not in obj:
            keys = ", ".join(map(str, obj)) or "none"
            raise BadRecordError(
                spec.path,
                line,
                "missing-key",
                f"no key {spec.json_key!r} (keys: {keys}); pass --json-key",
            )
        doc = obj[spec.json_key]
        if not isinstance(doc, str):
            raise BadRecordError(
                spec.path,
                line,
                "not-a-string",
                f"key {spec.json_key!r} holds {type(doc).__name__}, not a string",
            )
        # JSON can spell lone surrogates (\ud800) that are not encodable text; cheap pre-check.
        if "\\u" in text and _has_surrogate(doc):
            raise BadRecordError(
                spec.path, line, "invalid-utf8", "JSON string holds an unpaired surrogate escape"
            )
    elif spec.fmt == "csv":
        if raw is None:
            raise BadRecordError(
                spec.path, line, "missing-key", f"row has no field for column {spec.csv_column!r}"
            )
        doc = raw
        if _has_surrogate(doc):
            raise BadRecordError(spec.path, line, "invalid-utf8", "invalid UTF-8 in the csv field")
    else:
        doc = _decode(spec, line, raw)
    if not doc.strip():
        raise BadRecordError(spec.path, line, "empty-document", "empty document")
    return doc


def iter_documents(
    specs: list[InputSpec], skip_bad_lines: bool = False, skipped: dict | None = None
) -> Iterator[str]:
    """Yield every document of ``specs`` in order, single-process (used by tokenizer training).

    Bad records raise, or with ``skip_bad_lines`` are counted into ``skipped`` by reason.
    """
    for spec in specs:
        for line, raw in iter_raw_records(spec):
            try:
                yield parse_record(spec, line, raw)
            except BadRecordError as exc:
                if not skip_bad_lines:
                    raise
                if skipped is not None:
                    skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
