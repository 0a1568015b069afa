"""The ``plan`` subcommand and ``train --dry-run``: argument parsing and printing only."""

from __future__ import annotations

import argparse

from megagpt.config import Config, ConfigError, get_size, load_config
from megagpt.planner.hardware import GIB, GPU_TYPES, ClusterShape, gpu_type
from megagpt.planner.memory import ASSUMPTIONS as MEMORY_ASSUMPTIONS
from megagpt.planner.memory import BYTES, Layout
from megagpt.planner.search import DEFAULT_MEMORY_FRACTION, Plan, evaluate, search
from megagpt.planner.timing import ASSUMPTIONS as TIME_ASSUMPTIONS
from megagpt.planner.timing import DEFAULT_EFFICIENCY
from megagpt.planner.write import ROOT, write_pair


def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="rank parallel layouts of a model on a cluster by memory and step time",
        description="Memory per GPU and step time of every valid layout; prints the best and "
        "the assumptions; --write emits a config + sbatch pair.",
    )
    p.add_argument("--model", help="registered size, e.g. gpt3-175b (default: the config's)")
    p.add_argument(
        "--config",
        help="recipe whose batch, precision and hyperparameters are kept "
        "(default: configs/pretrain/<size>.yaml)",
    )
    p.add_argument("--nodes", type=int, required=True, help="nodes in the allocation")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument(
        "--gpu", default="h100-80gb", help=f"GPU type: {', '.join(GPU_TYPES)} (default h100-80gb)"
    )
    p.add_argument(
        "--efficiency",
        type=float,
        default=DEFAULT_EFFICIENCY,
        help=f"fraction of dense peak the matmuls reach (default {DEFAULT_EFFICIENCY})",
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=DEFAULT_MEMORY_FRACTION,
        help=f"fraction of GPU memory a plan may use (default {DEFAULT_MEMORY_FRACTION})",
    )
    p.add_argument("--top", type=int, default=8, help="layouts to list (default 8)")
    p.add_argument(
        "--check", action="store_true", help="evaluate the config's own layout instead of searching"
    )
    p.add_argument(
        "--write",
        metavar="DIR",
        help="write <DIR>/<model>_<N>x<G>-<gpu>.yaml and a matching .sbatch",
    )
    p.add_argument(
        "--sbatch-dir",
        metavar="DIR",
        help="where --write puts the .sbatch (default: the --write directory)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.global_batch_size=1536",
    )
    p.set_defaults(func=cmd_plan)


def _recipe_for(model: str) -> str | None:
    short = get_size(model).name.removeprefix("gpt3-")
    path = ROOT / "configs" / "pretrain" / f"{short}.yaml"
    return str(path) if path.is_file() else None


def _load(args) -> tuple[Config, str | None]:
    if not args.model and not args.config:
        raise ConfigError("plan: give --model NAME or --config RECIPE")
    recipe = args.config
    if recipe is None:
        try:
            recipe = _recipe_for(args.model)
        except KeyError as e:
            raise ConfigError(f"--model: {e.args[0]}") from None
    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.name={args.model}")
    cfg = load_config(recipe, overrides)
    return cfg, recipe


def _check_dir(flag: str, path: str) -> None:
    """ConfigError naming ``flag`` unless ``path`` is a writable folder or can be made one (its
    nearest existing ancestor is a writable folder). Creates nothing: a search that finds no
    layout leaves no empty folder behind; ``write_pair`` makes it."""
    import os
    from pathlib import Path

    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: cannot create the folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable")


def _summary(plan: Plan, shape: ClusterShape) -> str:
    t, pk = plan.time, plan.peak
    return (
        f"{plan.layout.describe()}: {pk.total / GIB:.1f} of {shape.gpu.memory_gib:g} GiB "
        f"(stage {pk.stage}), step {t.step_s:.2f} s, {t.tokens_per_s:,.0f} tokens/s, "
        f"{t.model_tflops_per_gpu:.0f} TFLOP/s/GPU, MFU {t.mfu:.1%}"
    )


def print_plan(plan: Plan, shape: ClusterShape) -> None:
    t = plan.time
    print(f"\nlayout: {plan.layout.describe()}")
    print(f"memory per GPU by stage (GiB; {shape.gpu.memory_gib:g} available):")
    print(
        f"  {'stage':>5} {'params':>14} {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'flat':>8} {'activ.':>8} {'logits':>8} {'buffers':>8} {'work':>8} {'total':>8}"
    )
    shown = plan.memory if len(plan.memory) <= 4 else [plan.memory[0], plan.peak, plan.memory[-1]]
    seen = set()
    for b in shown:
        if b.stage in seen:
            continue
        seen.add(b.stage)
        g = b.as_gib()
        print(
            f"  {b.stage:>5} {b.params:>14,} {g['weights']:>8.2f} {g['grads']:>8.2f} "
            f"{g['optimizer']:>8.2f} {g['flat']:>8.2f} {g['activations']:>8.2f} "
            f"{g['logits']:>8.2f} {g['buffers']:>8.2f} {g['workspace']:>8.2f} "
            f"{g['total']:>8.2f}"
        )
    print(
        f"step time: {t.step_s:.3f} s = compute {t.compute_s:.3f} + bubble {t.bubble_s:.3f} "
        f"+ TP comm {t.tp_comm_s:.3f} + PP comm {t.pp_comm_s:.3f} + DP comm "
        f"{t.dp_comm_s:.3f}"
    )
    print(
        f"throughput: {t.tokens_per_s:,.0f} tokens/s; {t.model_tflops_per_gpu:.1f} model "
        f"TFLOP/s per GPU; MFU {t.mfu:.1%}"
    )


def print_assumptions(args, shape: ClusterShape) -> None:
    g = shape.gpu
    print("\nassumptions:")
    print(
        f"  - GPU {g.name}: {g.memory_gib:g} GiB, dense peak bf16 "
        f"{g.peak_tflops('bf16'):g} TFLOP/s; NVLink {g.nvlink_gbs:g} GB/s and InfiniBand "
        f"{g.ib_gbs:g} GB/s per GPU per direction ({g.note})"
    )
    print(
        f"  - matmul efficiency {args.efficiency:g}; plans may use "
        f"{args.memory_fraction:.0%} of GPU memory"
    )
    for a in MEMORY_ASSUMPTIONS + TIME_ASSUMPTIONS:
        print(f"  - {a}")
    print(
        "  - MFU = model FLOPs (causal-halved attention, no recompute; "
        "megagpt.training.metrics) / dense peak, as the trainer logs it"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        shape = ClusterShape(args.nodes, args.gpus_per_node, gpu_type(args.gpu))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0 < args.memory_fraction <= 1:
        raise ConfigError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    if not 0 < args.efficiency <= 1:
        raise ConfigError(f"--efficiency must be in (0, 1], got {args.efficiency}")
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    if args.sbatch_dir and not args.write:
        raise ConfigError("--sbatch-dir only applies with --write DIR")
    if args.check and args.write:
        raise ConfigError("--write applies to a search; leave out --check")
    cfg, recipe = _load(args)
    m, t = cfg.model, cfg.train
    if args.write:
        if recipe is None:
            raise ConfigError(
                f"--write needs a recipe: give --config (no configs/pretrain file for {m.name})"
            )
        # Before the search, so that a bad folder is not found after the whole printout.
        _check_dir("--write", args.write)
        if args.sbatch_dir:
            _check_dir("--sbatch-dir", args.sbatch_dir)
    from megagpt.config import parameter_count

    print(
        f"model {m.name}: {parameter_count(m) / 1e9:.2f}B parameters, {m.num_layers} layers, "
        f"h={m.hidden_size}, seq {m.seq_length}; global batch {t.global_batch_size} x "
        f"{m.seq_length} = {t.global_batch_size * m.seq_length:,} tokens; {t.precision}"
    )
    print(f"cluster: {shape.describe()}")
    if args.check:
        if shape.world % (cfg.parallel.tensor * cfg.parallel.pipeline):
            raise ConfigError(
                f"--nodes x --gpus-per-node = {shape.world} is not divisible by "
                f"parallel.tensor x parallel.pipeline = {cfg.parallel.tensor} x "
                f"{cfg.parallel.pipeline}"
            )
        plan = evaluate(
            cfg,
            Layout.from_config(cfg, shape.world),
            shape,
            efficiency=args.efficiency,
            memory_fraction=args.memory_fraction,
        )
        if plan.time is not None:
            print_plan(plan, shape)
        print_assumptions(args, shape)
        if not plan.fits:
            print("\nDOES NOT FIT / INVALID:\n  - " + "\n  - ".join(plan.problems))
            return 1
        print("\nOK: the layout is valid and fits")
        return 0
    try:
        plans, rejected = search(
            cfg, shape, efficiency=args.efficiency, memory_fraction=args.memory_fraction
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"{len(plans)} layouts fit ({rejected} invalid or too large); fastest first:")
    print(
        f"  {'#':>2} {'layout':<52} {'GiB':>6} {'step s':>8} {'tokens/s':>11} "
        f"{'TF/GPU':>7} {'MFU':>6}"
    )
    for i, p in enumerate(plans[: args.top], 1):
        print(
            f"  {i:>2} {p.layout.describe():<52} {p.peak.total / GIB:>6.1f} "
            f"{p.time.step_s:>8.3f} {p.time.tokens_per_s:>11,.0f} "
            f"{p.time.model_tflops_per_gpu:>7.1f} {p.time.mfu:>6.1%}"
        )
    best = plans[0]
    print_plan(best, shape)
    print_assumptions(args, shape)
    if args.write:
        assert recipe is not None  # checked above
        cpath, spath = write_pair(
            recipe,
            m.name,
            best.layout,
            shape,
            _summary(best, shape),
            args.write,
            args.sbatch_dir,
            best.peak.params,
            BYTES[t.precision],
        )
        print(f"\nwrote {cpath}\nwrote {spath}")
    return 0


def add_dry_run_options(p: argparse.ArgumentParser) -> None:
    """The ``train`` options of the dry run."""
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve the config, rank layout, per-stage layers and parameters (meta "
        "device) and memory estimate; start nothing",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks for --dry-run (default: $WORLD_SIZE, else TP x PP)",
    )


def cmd_dry_run(args: argparse.Namespace) -> int:
    from megagpt.planner.dryrun import dry_run, world_size_default

    if args.world_size is not None and not args.dry_run:
        raise ConfigError(
            "--world-size only applies with --dry-run (under a launcher the "
            "world size comes from torchrun/srun)"
        )
    cfg = load_config(args.config, args.overrides)
    world = world_size_default(cfg, args.world_size)
    _, lines, ok = dry_run(cfg, world)
    print("\n".join(lines))
    return 0 if ok else 1
