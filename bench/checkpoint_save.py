"""Step-time cost of a training checkpoint: one save call against one training step.

Builds the trainer's engine for ``--size`` (default gpt3-base) in one process, as
bench/train_step.py does, times ``--iters`` training steps, then ``--saves`` calls of
``TrainingCheckpoints.save`` (the call ``Trainer.save`` makes: layout-free shards, meta, RNG
streams, manifest with CRC-32, ``latest``; synchronous), with the commit (manifest + ``latest``)
timed on its own, and the copy of every saved tensor to host memory (the part of a save that a
background writer could not take off the training thread). Prints medians, the checkpoint's
size and the save's cost in training steps.

    python bench/checkpoint_save.py                       # CPU: gpt3-base, seq 128, micro 4
    python bench/checkpoint_save.py --size gpt3-mini --saves 5 --dir /dev/shm/ckpt
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="gpt3-base")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="timed training steps")
    ap.add_argument("--saves", type=int, default=3, help="timed save calls")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    from megagpt import parallel
    from megagpt.checkpoint import training
    from megagpt.config import load_config, validate
    from megagpt.engine import Engine, build_model
    from megagpt.model import initialize_weights

    device = parallel.resolve_device("auto")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = load_config(
        None,
        [
            f"model.name={args.size}",
            f"model.seq_length={args.seq}",
            "model.dropout=0",
            "model.attention_dropout=0",
            f"train.precision={args.precision}",
            f"train.micro_batch_size={args.micro}",
            f"train.global_batch_size={args.micro}",
            "optim.lr=1e-4",
            "checkpoint.keep_last=1",
        ],
    )
    validate(cfg, 1, cuda=device.type == "cuda", need_data=False)
    print(
        f"# bench/checkpoint_save.py  {time.strftime('%Y-%m-%d %H:%M')}  "
        f"{platform.processor() or platform.machine()} {os.cpu_count()} CPUs  device={device}"
        f"  torch {torch.__version__}  threads={torch.get_num_threads()}  {args.size} "
        f"seq={args.seq} micro={args.micro} {args.precision}  load "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    ctx = parallel.initialize(cfg.parallel, device)
    root = Path(args.dir or tempfile.mkdtemp(prefix="megagpt-ckpt-bench-"))
    try:
        module = build_model(cfg, ctx.dims, device)
        initialize_weights(module, cfg.model, 1, 0, 1)
        engine = Engine(cfg, module, ctx)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.micro, args.seq + 1), generator=gen)
        batch = [
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": torch.ones(args.micro, args.seq),
            }
        ]
        steps = []
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            engine.train_step(batch)
            sync()
            if i >= args.warmup:
                steps.append(time.perf_counter() - start)
        ckpts = training.TrainingCheckpoints(str(root), cfg.checkpoint, engine.checkpoint_state())
        commits: list[float] = []
        commit = training.commit

        def timed_commit(*a, **kw):
            start = time.perf_counter()
            commit(*a, **kw)
            commits.append(time.perf_counter() - start)

        training.commit = timed_commit
        saves = []
        for k in range(args.saves):
            sync()
            start = time.perf_counter()
            tag = ckpts.save(args.warmup + args.iters + k, {"step": k, "consumed_samples": 0})
            sync()
            saves.append(time.perf_counter() - start)
        training.commit = commit
        # What a background save could not hide: copying every tensor it writes to host memory
        # (a clone here, already on the host on CPU), on the training thread.
        state, snaps = engine.checkpoint_state(), []
        for _ in range(args.saves):
            sync()
            start = time.perf_counter()
            copy = [
                state.optim.get(p, kind).detach().float().to("cpu", copy=True)
                for _, p, _, _ in state.params(True)
                for kind in training.reshard.KINDS
            ]
            sync()
            snaps.append(time.perf_counter() - start)
            del copy
        size = folder_bytes(root / tag)
        n_params = sum(p.numel() for p in module.parameters())
    finally:
        parallel.destroy()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    step, save, com, snap = (statistics.median(x) for x in (steps, saves, commits, snaps))
    print(
        f"{'size':<10} {'params':>8} {'ckpt MiB':>9} {'step s':>7} {'save s':>7} "
        f"{'commit s':>8} {'host copy s':>11} {'save/step':>9} {'MiB/s':>7}"
    )
    print(
        f"{args.size:<10} {n_params / 1e6:>7.1f}M {size / 2**20:>9.0f} {step:>7.3f} "
        f"{save:>7.3f} {com:>8.3f} {snap:>11.3f} {save / step:>9.2f} "
        f"{size / 2**20 / save:>7.0f}"
    )
    print(
        f"# saves (s): {', '.join(f'{s:.3f}' for s in saves)}; steps (s): "
        f"{', '.join(f'{s:.3f}' for s in steps)}; load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
