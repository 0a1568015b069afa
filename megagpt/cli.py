"""`megagpt <subcommand>`: thin; parses arguments and calls into the package.

User errors (every ``megagpt.errors.MegagptError``: config, data, checkpoint) print one line
``megagpt <command>: error: ...`` and exit with status 2, no traceback; a training run stopped
because it cannot go on safely (``TrainingError``: ``train.max_bad_steps`` non-finite steps in a
row) exits with status 3, so a scheduler can tell it from a bad config and need not requeue it.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _quiet() -> None:
    # megatron-core warns at import that TE/apex are absent; they are optional for us.
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*[Aa]pex.*")


def cmd_models(args: argparse.Namespace) -> int:
    from megagpt.config.sizes import get_size, names, parameter_count

    print(
        f"{'name':<11} {'layers':>6} {'heads':>5} {'d_model':>7} {'head_dim':>8} "
        f"{'params':>10} {'LR':>8} {'batch tokens':>13} {'seqs':>5}  source"
    )
    for n in names():
        s = get_size(n)
        m = s.model_config()
        count = parameter_count(m)
        shown = f"{count / 1e9:.3f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
        print(
            f"{n:<11} {m.num_layers:>6} {m.num_heads:>5} {m.hidden_size:>7} {m.head_dim:>8} "
            f"{shown:>10} {s.lr:>8.1e} {s.batch_tokens:>13,} {s.global_batch_sequences:>5}  "
            f"{s.source}"
        )
    print(
        "params: tied input/output embedding, vocab as listed by the size (25,600 for the "
        "GPT-3 rows), 2048 learned positions."
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.dry_run or args.world_size is not None:
        from megagpt.planner.cli import cmd_dry_run

        return cmd_dry_run(args)
    from megagpt.config import load_config

    cfg = load_config(args.config, args.overrides)
    from megagpt.training.trainer import train
    from megagpt.training.watchdog import report_collective_timeout

    with report_collective_timeout():  # a hang: one line naming phase and step, exit 4
        train(cfg)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from megagpt.config import load_config

    cfg = load_config(args.config, args.overrides)
    from megagpt.training.finetune import finetune
    from megagpt.training.watchdog import report_collective_timeout

    with report_collective_timeout():
        finetune(cfg)
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    from megagpt.config.docs import render_markdown

    text = render_markdown()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from megagpt.quickstart import run

    return run(args.overrides)


def cmd_convert(args: argparse.Namespace) -> int:
    from megagpt.checkpoint.convert import run

    return run(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from megagpt.training.plots import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megagpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered model sizes with parameter counts")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="pretrain (single process or under torchrun/srun)")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/pretrain/tiny.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.steps=100 parallel.tensor=2",
    )
    from megagpt.planner.cli import add_dry_run_options, add_plan_parser

    add_dry_run_options(p)
    p.set_defaults(func=cmd_train)

    add_plan_parser(sub)

    p = sub.add_parser(
        "quickstart",
        help="tokenizer + preprocessing + a small CPU pretraining run on the bundled sample corpus",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides for configs/pretrain/tiny.yaml"
    )
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("config-docs", help="print the config reference (from the field docs)")
    p.add_argument("--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_config_docs)

    p = sub.add_parser(
        "convert",
        help="convert checkpoints between training checkpoints (any "
        "TP/PP), model dirs, ModelScope GPT-3 and Hugging Face GPT-2",
    )
    p.add_argument("--input", required=True, help="checkpoint or model directory (kind detected)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument(
        "--to",
        required=True,
        choices=("megagpt", "modelscope", "hf"),
        help="output kind; modelscope writes the layout its pipeline loads with the model's "
        "tokenizer: BERT vocab.txt -> base/large (pytorch_model.bin), jieba-BPE tokenizer.json "
        "or none -> 1.3B+ (model/mp_rank_XX_model_states.pt); SentencePiece is refused",
    )
    p.add_argument(
        "--tp",
        type=int,
        help="megagpt: training checkpoint for this TP size; modelscope: number of shards "
        "(1.3B+ layout; a BERT vocab.txt model is written as the one-file base/large layout)",
    )
    p.add_argument("--pp", type=int, help="megagpt: training checkpoint for this many stages")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output (the old one is removed once the new one is complete)",
    )
    p.set_defaults(func=cmd_convert)

    from megagpt.data.cli import add_preprocess_parser, add_tokenizer_parser

    add_tokenizer_parser(sub)
    add_preprocess_parser(sub)

    from megagpt.inference.cli import add_generate_parser

    add_generate_parser(sub)

    p = sub.add_parser(
        "finetune",
        help="fine-tune on src_txt / src_txt+tgt_txt jsonl or csv "
        "(single process or under torchrun)",
    )
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/finetune/poetry.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. finetune.init_from=runs/x/model train.steps=50",
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "plot",
        help="loss, LR, grad norm, tokens/s and MFU curves of run "
        "directories (from metrics.jsonl) into one PNG",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to overlay")
    p.add_argument(
        "--out",
        metavar="FILE.png",
        help="output PNG (default: RUN_DIR/metrics.png for one run, ./metrics.png for several)",
    )
    p.set_defaults(func=cmd_plot)

    from megagpt.curation.cli import add_clean_parser
    from megagpt.evaluation.cli import add_eval_parser
    from megagpt.serving.cli import add_serve_parser

    add_eval_parser(sub)
    add_serve_parser(sub)
    add_clean_parser(sub)
    return parser


def _error_line(command: str, e: BaseException) -> None:
    """One line on stderr, no traceback: every rank of a torchrun job prints its own (an error
    may be seen by one rank only), tagged with the rank when there are several."""
    import os

    rank = os.environ.get("RANK")
    tag = f" [rank {rank}]" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    message = " ".join(str(e).split("\n")).strip() or type(e).__name__
    print(f"megagpt {command}: error:{tag} {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = build_parser().parse_args(argv)
    from megagpt.errors import MegagptError, TrainingError

    try:
        return int(args.func(args) or 0)
    except (MegagptError, FileNotFoundError) as e:
        _error_line(args.command, e)
        return 3 if isinstance(e, TrainingError) else 2
    except KeyboardInterrupt:
        print(f"megagpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `megagpt models | head`: the reader left; not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
