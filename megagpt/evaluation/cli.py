"""``megagpt eval``: perplexity on a dataset and/or lm-evaluation-harness tasks.

Under ``torchrun --nproc-per-node N`` the model is split over ``--tp`` ranks (default N; the
remaining factor shares the perplexity documents as data parallel); every rank computes and
global rank 0 writes.
"""

from __future__ import annotations

import argparse
import json


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity / bits per character on a dataset, and "
        "lm-evaluation-harness tasks (tensor parallel under torchrun)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="megagpt model directory (<run.dir>/model) "
        "or any checkpoint `megagpt convert` reads (run dir, step_* folder, ...)",
    )
    p.add_argument(
        "--data",
        help="dataset for perplexity: .jsonl, .txt (one document per "
        "line) or an indexed dataset PREFIX (PREFIX.bin/.idx)",
    )
    p.add_argument("--json-key", default="text", help="jsonl key holding the document text")
    p.add_argument(
        "--blank-line-separated",
        action="store_true",
        help="txt: documents are separated by blank lines",
    )
    p.add_argument(
        "--window", type=int, help="tokens per forward pass (default: the model's positions)"
    )
    p.add_argument(
        "--stride",
        type=int,
        help="sliding-window stride for long documents "
        "(default: the window, i.e. disjoint windows; smaller = more context)",
    )
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip (and count) records "
        "that are not documents (bad JSON, missing key, empty text) instead of "
        "stopping at the first",
    )
    p.add_argument("--limit-docs", type=int, default=0, help="score the first N documents")
    p.add_argument(
        "--per-document", metavar="FILE.jsonl", help="also write one record per document"
    )
    p.add_argument(
        "--tasks",
        help="comma-separated lm-eval task names (e.g. megagpt_zh_mc, "
        "ceval-valid, cmmlu, xcopa_zh)",
    )
    p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples")
    p.add_argument("--limit", type=float, help="lm-eval: documents per task (or a fraction)")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="extra folder of lm-eval task YAMLs (repeatable)",
    )
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="keep per-sample lm-eval outputs in the results (needs --output)",
    )
    p.add_argument("--output", metavar="FILE.json", help="results JSON (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the torchrun world)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the checkpoint's")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.set_defaults(func=cmd_eval)


def _check(args: argparse.Namespace) -> list[str]:
    from megagpt.evaluation.model import EvalError

    if not args.data and not args.tasks:
        raise EvalError(
            "megagpt eval needs --data FILE (perplexity) and/or --tasks T1,T2 (lm-eval)"
        )
    for flag in ("window", "stride", "batch_size", "tp"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.per_document and not args.data:
        raise EvalError("--per-document needs --data (it lists the perplexity documents)")
    if args.log_samples and not args.output:
        raise EvalError("--log-samples needs --output FILE.json")
    if args.data:
        import os

        prefix = args.data[:-4] if args.data.endswith((".bin", ".idx")) else args.data
        if not (os.path.isfile(args.data) or os.path.isfile(prefix + ".bin")):
            raise EvalError(
                f"--data {args.data}: no such file or indexed dataset (a .jsonl / "
                ".txt file, or PREFIX of PREFIX.bin and PREFIX.idx)"
            )
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks and not tasks:
        raise EvalError(f"--tasks {args.tasks!r}: no task name")
    return tasks


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``megagpt eval``; user errors raise EvalError (a MegagptError: one line, exit 2)."""
    from megagpt.evaluation.model import load_scorer, require_lm_eval
    from megagpt.evaluation.perplexity import perplexity, write_results

    tasks = _check(args)
    # Everything a user can get wrong is checked before the model loads: options, files,
    # lm-eval being installed, the task names.
    harness = require_lm_eval() if tasks else None
    manager = harness.task_manager(tasks, args.include_path) if tasks else None
    scorer = load_scorer(
        args.model, device=args.device, dtype=args.dtype, tensor=args.tp, tokenizer=args.tokenizer
    )
    summary: dict = {"model": args.model}
    records: list[dict] = []
    if args.data:
        ppl, records = perplexity(
            scorer,
            args.data,
            window=args.window,
            stride=args.stride,
            batch_size=args.batch_size,
            json_key=args.json_key,
            paragraphs=args.blank_line_separated,
            limit=args.limit_docs,
            skip_bad_lines=args.skip_bad_lines,
        )
        summary["perplexity"] = {"data": args.data, **ppl}
    if tasks:
        lm = harness.MegagptLM(scorer=scorer, batch_size=args.batch_size, max_length=args.window)
        results = harness.run_tasks(
            lm,
            tasks,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            manager=manager,
            log_samples=args.log_samples,
        )
        if results is not None:
            summary["tasks"] = json.loads(
                json.dumps(
                    {
                        k: results[k]
                        for k in ("results", "versions", "n-shot", "configs", "samples")
                        if k in results
                    },
                    default=str,
                    ensure_ascii=False,
                )
            )
            summary["metrics"] = harness.flat_metrics(results)
    if scorer.is_writer:
        write_results(summary, records, args.output, args.per_document if args.data else None)
    return 0
