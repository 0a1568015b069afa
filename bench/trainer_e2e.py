"""The trainer end to end against a plain PyTorch loop, same tokens, same run.

megagpt side: ``megagpt train`` in a subprocess with its defaults (the ZeRO stage, optimizer,
clipping and schedule it would use), a 4-layer GPT (h 256, 4 heads, seq 128, global batch 16,
one process, fp32 unless --precision), no evaluation and no checkpoint until the end; tokens/s is
read from its metrics.jsonl after the warm-up windows.

Peer: the loop a researcher would write: Hugging Face ``GPT2LMHeadModel`` of the same shape,
torch AdamW (same betas, eps and weight-decay groups), gradient clipping at 1.0 and megagpt's LR
schedule, on the same global batches (read from the same GPT sample index), timed the same way.

The two alternate (--rounds times) and the ratio is the median of each round's ratio, so load
that drifts during the run hits both sides. ``--clock cpu`` (for a shared machine, with
``--threads 1``) times both sides in process CPU time instead of wall time: the trainer runs as
``megagpt train`` with only its throughput window's clock swapped (``CPU_CLOCK_TRAIN``).

    python bench/trainer_e2e.py                       # CPU defaults
    python bench/trainer_e2e.py --steps 60 --rounds 3 --zero 0
    python bench/trainer_e2e.py --threads 1        # a shared machine: one thread each side
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "megagpt" / "assets" / "sample_corpus.jsonl"
RECIPE = ROOT / "configs" / "pretrain" / "tiny.yaml"  # the quickstart's; shape overridden below

SHAPE = [
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.num_heads=4",
    "model.seq_length=128",
    "model.max_position_embeddings=128",
    "model.dropout=0",
    "model.attention_dropout=0",
]


def prepare(root: Path) -> tuple[str, str]:
    """Tokenizer (vocab 4096) and an indexed dataset of the bundled sample corpus."""
    from megagpt.data import make_input_spec, preprocess, train_tokenizer

    docs = [json.loads(x)["text"] for x in SAMPLE.read_text("utf-8").splitlines() if x.strip()]
    train_tokenizer(iter(docs), str(root / "tok"), vocab_size=4096)
    preprocess(
        [make_input_spec(str(SAMPLE))],
        str(root / "tok"),
        str(root / "data"),
        append_eod=True,
        progress=False,
    )
    return str(root / "tok"), str(root / "data")


def overrides(args, tok: str, prefix: str, run_dir: Path) -> list[str]:
    out = SHAPE + [
        f"data.paths=[{prefix}]",
        f"data.tokenizer={tok}",
        "data.split=100,0,0",
        f"train.steps={args.steps}",
        "train.global_batch_size=16",
        "train.micro_batch_size=16",
        f"train.precision={args.precision}",
        f"train.log_interval={args.window}",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "logging.wandb=disabled",
        "optim.lr=6e-4",
        "optim.warmup_tokens=20000",
        "optim.decay_tokens=2000000",
        f"run.dir={run_dir}",
    ]
    if args.zero is not None:
        out.append(f"parallel.zero_stage={args.zero}")
    return out + args.set


# `megagpt train` whose tokens/s windows count process CPU time (ThroughputWindow's clock is
# injectable); everything else is the CLI's own path.
CPU_CLOCK_TRAIN = (
    "import sys, time\n"
    "import megagpt.training.trainer as trainer\n"
    "from megagpt.training.metrics import ThroughputWindow\n"
    "trainer.ThroughputWindow = lambda: ThroughputWindow(clock=time.process_time)\n"
    "from megagpt.cli import main\n"
    "sys.argv[0] = 'megagpt'\n"
    "sys.exit(main())\n"
)


def megagpt_tokens_per_s(args, tok: str, prefix: str, run_dir: Path) -> float:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    entry = ["-c", CPU_CLOCK_TRAIN] if args.clock == "cpu" else ["-m", "megagpt.cli"]
    subprocess.run(
        [
            sys.executable,
            *entry,
            "train",
            "--config",
            str(RECIPE),
            *overrides(args, tok, prefix, run_dir),
        ],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    rates = [
        json.loads(x)["tokens_per_s"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "tokens_per_s" in x
    ]
    return statistics.median(rates[args.warmup_windows :])


def plain_loop_tokens_per_s(args, tok: str, prefix: str) -> float:
    """The peer: HF GPT-2 + torch AdamW + clipping + megagpt's LR schedule, same batches."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from megagpt.config import load_config
    from megagpt.data import build_gpt_datasets
    from megagpt.training.schedules import learning_rate

    cfg = load_config(RECIPE, overrides(args, tok, prefix, Path(tempfile.mkdtemp())))
    m, o = cfg.model, cfg.optim
    m.vocab_size = 4096
    # The trainer's sample index (megagpt.training.trainer._build_data sizes it to the decay
    # horizon), so both sides read the same global batches in the same order.
    planned = max(args.steps * 16, math.ceil(o.decay_tokens / m.seq_length))
    ds, _, _ = build_gpt_datasets(
        [prefix], None, "100,0,0", m.seq_length, (planned, 0, 0), cfg.train.seed, tempfile.mkdtemp()
    )
    torch.manual_seed(cfg.train.seed)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=4096,
            n_positions=m.max_position_embeddings,
            n_embd=m.hidden_size,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.ffn,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
        )
    )
    hf.config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    hf = hf.to(dtype)
    decay = [p for n, p in hf.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in hf.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    seq, rates, window_tokens, elapsed = m.seq_length, [], 0, 0.0
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for step in range(args.steps):
        start = clock()
        batch = torch.from_numpy(
            np.stack([ds[step * 16 + i]["tokens"] for i in range(16)]).astype(np.int64)
        )
        for g in opt.param_groups:
            g["lr"] = learning_rate(o, tokens=step * 16 * seq, step=step)
        logits = hf(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch[:, 1:].flatten()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer reads its loss every step too
        elapsed += clock() - start
        window_tokens += 16 * seq
        if (step + 1) % args.window == 0:
            rates.append(window_tokens / elapsed)
            window_tokens, elapsed = 0, 0.0
    return statistics.median(rates[args.warmup_windows :])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--window", type=int, default=10, help="steps per logged window")
    ap.add_argument("--warmup-windows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument(
        "--zero",
        type=int,
        default=None,
        help="parallel.zero_stage (default: the trainer's default)",
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads on both sides (0: the default)"
    )
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="time both sides in wall time or process CPU time",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra `megagpt train` override, e.g. train.compile=always",
    )
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tok, prefix = prepare(Path(tmp))
        print(
            f"# bench/trainer_e2e.py {time.strftime('%Y-%m-%d')} {platform.machine()} "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, {args.precision}, zero {args.zero if args.zero is not None else 'default'}"
            f", {args.clock} clock, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        ratios = []
        for r in range(args.rounds):
            ours = megagpt_tokens_per_s(args, tok, prefix, Path(tmp) / f"run{r}")
            theirs = plain_loop_tokens_per_s(args, tok, prefix)
            ratios.append(ours / theirs)
            print(
                f"round {r + 1}: megagpt train {ours:,.0f} tok/s | plain loop {theirs:,.0f} "
                f"tok/s | ratio {ours / theirs:.2f} | load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        print(f"median ratio megagpt / plain loop: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
