#!/usr/bin/env python
"""Merge several megatron-core indexed datasets (PREFIX.bin/.idx) into one, in the order given.

    python tools/merge_datasets.py --input data/wiki_text_document data/laws_text_document \\
        --output-prefix data/zh_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all   # Megatron style

Each ``--input`` is a dataset prefix (``.bin``/``.idx`` suffixes are dropped) or a directory,
which stands for every dataset in it in name order (as Megatron-LM's ``merge_datasets.py
--input DIR``). All inputs must store tokens in the same dtype (uint16 for vocabularies up to
65,536, int32 above): datasets of different dtypes were made with different tokenizers, whose
ids mean different tokens, and are refused. The output is written by megagpt's own writer
(``megagpt.data.indexed``: crash-safe, ``.idx`` last), one sequence per document; an input whose
documents hold several sequences (Megatron's ``--split-sentences``) is refused.

For a training mix, prefer ``data.paths`` with weights (blending: no copy); merge when a fixed
concatenation is wanted, e.g. to shuffle many small shards as one dataset.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megagpt.data import indexed  # noqa: E402
from megagpt.data.errors import DataError  # noqa: E402

PROG = "merge_datasets.py"
# Tokens copied per write: bounded memory whatever the dataset size (64 M uint16 = 128 MB).
CHUNK_TOKENS = 64 * 1024 * 1024


def expand_inputs(inputs: list[str]) -> list[str]:
    """Dataset prefixes for ``inputs`` (prefixes, PREFIX.bin/.idx paths, or directories)."""
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(name[:-4] for name in os.listdir(item) if name.endswith(".idx"))
            if not found:
                raise DataError(f"{item}: directory holds no .idx/.bin dataset")
            prefixes += [os.path.join(item, name) for name in found]
            continue
        prefix = item[:-4] if item.endswith((".bin", ".idx")) else item
        if not indexed.dataset_exists(prefix):
            raise DataError(f"{item}: no dataset here ({prefix}.bin and {prefix}.idx expected)")
        prefixes.append(prefix)
    return prefixes


def _open(prefix: str) -> indexed.IndexedDataset:
    ds = indexed.IndexedDataset(prefix)
    n = len(ds)
    if not np.array_equal(ds.document_indices, np.arange(n + 1)):
        raise DataError(
            f"{prefix}: {n} sequences in {ds.num_documents} documents (sentence-split?); only "
            "datasets with one sequence per document can be merged"
        )
    expected = np.zeros(n, np.int64)
    if n:
        np.cumsum(ds.sequence_lengths[:-1], dtype=np.int64, out=expected[1:])
    if not np.array_equal(ds.sequence_pointers, expected * ds.dtype.itemsize):
        raise DataError(f"{prefix}.idx: sequences are not stored back to back in {prefix}.bin")
    return ds


def merge(
    inputs: list[str], output_prefix: str, *, overwrite: bool = False, log=print
) -> tuple[int, int]:
    """Concatenate the datasets ``inputs`` (prefixes, in order) into ``output_prefix``.

    Returns:
        (documents, tokens) written.

    Raises:
        DataError: a missing input, different token dtypes, a sentence-split input, an
            existing output without ``overwrite``, or the output being one of the inputs.
    """
    prefixes = expand_inputs(inputs)
    if not prefixes:
        raise DataError("no input datasets given")
    out_abs = os.path.abspath(output_prefix)
    for p in prefixes:
        if os.path.abspath(p) == out_abs:
            raise DataError(f"--output-prefix {output_prefix} is also an input; write elsewhere")
    if not overwrite and (
        os.path.exists(indexed.bin_path(output_prefix))
        or os.path.exists(indexed.idx_path(output_prefix))
    ):
        raise DataError(f"{output_prefix}.bin/.idx already exist; pass --overwrite to replace them")
    datasets = [_open(p) for p in prefixes]
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{ds.prefix}: {ds.dtype}" for ds in datasets)
        raise DataError(
            f"inputs store tokens in different dtypes ({listing}); they were made "
            "with different tokenizers and cannot be merged"
        )
    dtype = dtypes.pop()
    # The tokenizer the inputs record (size, and fingerprint when every input has one): carried
    # into the merge; different ones are refused, their ids meaning different tokens.
    kwargs = indexed.merged_vocab(prefixes)
    with indexed.IndexedDatasetWriter(output_prefix, dtype, **kwargs) as writer:
        for ds in datasets:
            lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
            ends = np.cumsum(lengths, dtype=np.int64)  # token offset after each document
            start = 0
            while start < len(lengths):
                # As many whole documents as fit in a chunk (at least one).
                base = int(ends[start - 1]) if start else 0
                stop = max(start + 1, int(np.searchsorted(ends, base + CHUNK_TOKENS, side="right")))
                total = int(ends[stop - 1]) - base
                # Sequences lie back to back (checked in _open): one read covers the chunk.
                tokens = np.array(ds.get(start, 0, total)) if total else np.zeros(0, dtype)
                writer.add_documents(tokens, lengths[start:stop])
                start = stop
            log(f"  {ds.prefix}: {ds.num_documents:,} documents, {ds.num_tokens:,} tokens")
        documents, tokens = writer.num_documents, writer.num_tokens
    return documents, tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PREFIX_OR_DIR",
        help="dataset prefixes (or directories of datasets, taken in name order), "
        "merged in the order given",
    )
    p.add_argument(
        "--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(f"merging into {args.output_prefix}:")
        documents, tokens = merge(args.input, args.output_prefix, overwrite=args.overwrite)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {documents:,} documents, {tokens:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
