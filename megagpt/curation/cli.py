"""``megagpt clean``: argument parsing only (the work is in :mod:`megagpt.curation.pipeline`).

``megagpt/cli.py`` registers it with :func:`add_clean_parser`. User errors raise
:class:`megagpt.data.errors.DataError`; the top-level CLI prints one line and exits 2.
"""

from __future__ import annotations

import argparse

from megagpt.data.cli import add_reader_args, input_specs


def add_clean_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``clean`` on ``subparsers``."""
    p = subparsers.add_parser(
        "clean",
        help="filter and deduplicate raw Chinese text into jsonl shards (before preprocess)",
        description="Normalise, filter (character-based, for Chinese), remove exact and near "
        "duplicates (MinHash + LSH) and write OUTPUT/part-*.jsonl, duplicates.jsonl and "
        "report.json/report.md. Rerunning an interrupted command resumes it.",
    )
    add_reader_args(p, required=False)  # --print-config needs none
    p.add_argument("--output", metavar="DIR", help="output directory")
    p.add_argument("--config", metavar="YAML", help="clean config (see --print-config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key, e.g. --set dedup.threshold=0.7 (repeatable)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1); the output is the same for any value",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an earlier (finished or unfinished) clean in DIR",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective config as commented YAML and exit",
    )
    p.set_defaults(func=run_clean)
    return p


def run_clean(args: argparse.Namespace) -> int:
    """Run ``megagpt clean`` from parsed arguments; returns the exit code."""
    try:
        return _run_clean(args)
    except KeyboardInterrupt:
        import sys

        # The journal keeps what was committed: say so before megagpt.cli reports the ^C.
        print("megagpt clean: rerun the same command to resume", file=sys.stderr)
        raise


def _run_clean(args: argparse.Namespace) -> int:
    from megagpt.curation.config import load_clean_config, render_yaml
    from megagpt.data.errors import DataError

    cfg = load_clean_config(args.config, args.overrides)
    if args.print_config:
        print(render_yaml(cfg), end="")
        return 0
    if not args.input or not args.output:
        raise DataError("--input and --output are required (or --print-config)")
    specs = input_specs(args)
    from megagpt.curation.pipeline import clean

    report = clean(
        specs,
        args.output,
        cfg,
        workers=args.workers,
        skip_bad_lines=args.skip_bad_lines,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    j = report.to_json()
    d = j["documents"]
    removed = ", ".join(f"{k} {v['documents']}" for k, v in j["filters"].items() if v["documents"])
    print(
        f"wrote {args.output}: {d['written']:,} of {d['records']:,} documents in "
        f"{len(j['shards'])} shard(s); removed {d['removed']:,}"
        + (f" ({removed})" if removed else "")
        + f"; bad skipped {d['bad_skipped']:,}; "
        f"report in {args.output}/report.md"
    )
    return 0
