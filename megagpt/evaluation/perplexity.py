"""Perplexity and bits per character of a model on a jsonl / txt / indexed (.bin/.idx) dataset.

Every token of a document is predicted. The first one is predicted after the tokenizer's
end-of-document token, as in pretraining, where a document follows the previous one's EOD
(a tokenizer without one cannot predict the first token: it is then not scored). A document
longer than the model's window is scored with a sliding window: each forward pass sees at most
``window`` tokens and scores the tokens the previous windows have not, so every scored token
keeps at least ``window - stride`` tokens of context (``stride = window``: disjoint windows,
as lm-eval's rolling log-likelihood).

Bits per character (total NLL / ln 2 / characters) does not depend on the tokenizer, so models
with different vocabularies can be compared on the same text; characters are Unicode code
points of the document text (for an indexed dataset, of the decoded tokens).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from megagpt.evaluation.model import EvalError, Scorer

LN2 = math.log(2.0)


@dataclass
class Window:
    """One forward pass of a document: ``inputs`` -> ``targets`` (same length); only the last
    ``scored`` targets count (the rest are context already scored by an earlier window)."""

    doc: int
    inputs: list[int]
    targets: list[int]
    scored: int


def windows(doc: int, seq: list[int], window: int, stride: int) -> list[Window]:
    """Sliding windows predicting ``seq[1:]`` from the tokens before each.

    ``seq`` starts with the context token (EOD) or the document's first token. Every target
    is scored exactly once; with ``len(seq) - 1 <= window`` there is one full-context window.
    """
    if not 1 <= stride <= window:
        raise EvalError(f"--stride {stride}: must be between 1 and the window ({window})")
    out: list[Window] = []
    last = len(seq) - 1  # targets are seq[1 .. last]
    done = 0  # targets seq[1 .. done] are scored
    begin = 0
    while done < last:
        end = min(begin + window, last)  # inputs seq[begin:end] -> targets seq[begin+1:end+1]
        out.append(Window(doc, seq[begin:end], seq[begin + 1 : end + 1], end - done))
        done = end
        begin += stride
    return out


def score_windows(scorer: Scorer, items: list[Window], batch_size: int) -> dict[int, float]:
    """Total NLL (nats) per document over ``items``, batched longest first (similar lengths
    share a batch, so little padding is computed)."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].inputs))
    nll: dict[int, float] = {}
    for start in range(0, len(order), max(1, batch_size)):
        chunk = [items[i] for i in order[start : start + batch_size]]
        scored = scorer.token_logprobs([w.inputs for w in chunk], [w.targets for w in chunk])
        for w, (lp, _) in zip(chunk, scored):
            nll[w.doc] = nll.get(w.doc, 0.0) - float(lp[len(lp) - w.scored :].sum())
    return nll


@dataclass
class Document:
    index: int
    tokens: list[int]
    characters: int


def read_documents(
    path: str,
    tokenizer,
    *,
    json_key: str = "text",
    paragraphs: bool = False,
    limit: int = 0,
    skip_bad_lines: bool = False,
    skipped: dict | None = None,
) -> Iterator[Document]:
    """Documents of a jsonl / txt file (tokenized here) or an indexed dataset prefix (tokens
    as stored; a dataset made with ``--append-eod`` scores each document's EOD too).

    A bad record (invalid JSON, missing key, empty text) raises EvalError naming file:line,
    or with ``skip_bad_lines`` is counted into ``skipped`` by reason."""
    from megagpt.data.errors import DataError

    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
        from megagpt.data.indexed import IndexedDataset, TokenizerRecord, check_vocab

        try:
            # The model's tokenizer must be the one the dataset was made with (its size and,
            # where both record one, its fingerprint): else the ids score other tokens.
            check_vocab(
                prefix,
                tokenizer.vocab_size,
                f"{path} (dataset)",
                TokenizerRecord.of(tokenizer),
                name="the model's tokenizer",
            )
            ds = IndexedDataset(prefix)
        except (DataError, ValueError) as e:
            raise EvalError(str(e)) from None
        for i in range(len(ds)):
            if limit and i >= limit:
                return
            ids = [int(t) for t in ds[i]]
            yield Document(i, ids, len(tokenizer.decode(ids)))
        return
    from megagpt.data.readers import iter_documents, make_input_spec

    try:
        spec = make_input_spec(path, json_key=json_key, paragraphs=paragraphs)
    except DataError as e:
        raise EvalError(
            f"{e} (give a .jsonl/.txt file or an indexed dataset PREFIX with "
            "PREFIX.bin and PREFIX.idx)"
        ) from None
    try:
        for i, text in enumerate(iter_documents([spec], skip_bad_lines, skipped)):
            if limit and i >= limit:
                return
            yield Document(i, tokenizer.encode(text), len(text))
    except DataError as e:  # a bad record names file:line
        raise EvalError(str(e)) from None


def perplexity(
    scorer: Scorer,
    path: str,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    json_key: str = "text",
    paragraphs: bool = False,
    limit: int = 0,
    skip_bad_lines: bool = False,
) -> tuple[dict, list[dict]]:
    """(corpus summary, per-document records) of ``scorer`` on the dataset at ``path``.

    ``window`` defaults to the model's positions, ``stride`` to the window. Documents are
    shared over the data-parallel replicas and gathered, so every rank returns the same
    result. Documents without a token are counted (``empty_documents``) and skipped; bad
    records are an error unless ``skip_bad_lines`` (then counted in ``skipped_records``).
    """
    window = window or scorer.max_positions
    if not 1 <= window <= scorer.max_positions:
        raise EvalError(
            f"--window {window}: must be between 1 and the model's {scorer.max_positions} positions"
        )
    stride = stride or window
    # A document's first token is predicted from the family's bos ([CLS]), else from the
    # previous document's end; a stored document that starts with its bos keeps its own.
    start, bos = scorer.tokenizer.context_id, scorer.tokenizer.bos
    docs, items, empty, skipped = {}, [], 0, {}
    for d in read_documents(
        path,
        scorer.tokenizer,
        json_key=json_key,
        paragraphs=paragraphs,
        limit=limit,
        skip_bad_lines=skip_bad_lines,
        skipped=skipped,
    ):
        own = start is None or (bos is not None and d.tokens[:1] == [bos])
        seq = d.tokens if own else [start] + d.tokens
        if len(seq) < 2:
            empty += 1
            continue
        docs[d.index] = (len(seq) - 1, d.characters)
        if d.index % scorer.dp_size == scorer.dp_rank:
            items += windows(d.index, seq, window, stride)
    if not docs:
        raise EvalError(f"{path}: no document with a token to score")
    local = score_windows(scorer, items, batch_size)
    if scorer.dp_size > 1:
        parts = [None] * scorer.dp_size
        dist.all_gather_object(parts, local, group=scorer.dp_group)
        local = {k: v for p in parts for k, v in p.items()}
    records = [_record(i, local[i], *docs[i]) for i in sorted(docs)]
    summary = _record(
        None,
        sum(local.values()),
        sum(n for n, _ in docs.values()),
        sum(c for _, c in docs.values()),
    )
    summary.pop("index")
    summary.update(
        documents=len(docs),
        empty_documents=empty,
        skipped_records=skipped,
        window=window,
        stride=stride,
        first_token_context=(
            "none (not scored)"
            if start is None
            else "bos"
            if start == scorer.tokenizer.bos
            else "eod"
        ),
        tensor_parallel=scorer.tp_size,
        data_parallel=scorer.dp_size,
    )
    return summary, records


def _record(index, nll: float, tokens: int, characters: int) -> dict:
    loss = nll / tokens
    return {
        "index": index,
        "tokens": tokens,
        "characters": characters,
        "nll": nll,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / LN2,
        "bits_per_character": nll / LN2 / characters if characters else None,
    }


def write_results(
    summary: dict, records: list[dict], output: str | None, per_document: str | None
) -> None:
    """Write the summary JSON (``output``; stdout when None) and the per-document jsonl."""
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    if output:
        _atomic_write(output, text + "\n")
    else:
        print(text)
    if per_document:
        _atomic_write(
            per_document, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


__all__ = [
    "Document",
    "Window",
    "perplexity",
    "read_documents",
    "score_windows",
    "windows",
    "write_results",
]
