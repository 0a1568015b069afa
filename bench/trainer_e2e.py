"""The trainer end to end against a plain PyTorch loop, same tokens, same run.

megagpt side: ``megagpt train`` in a subprocess with its defaults (the ZeRO stage, optimizer,
clipping and schedule it would use), a 4-layer GPT (h 256, 4 heads, seq 128, global batch 16,
one process, fp32 unless --precision), no evaluation and no checkpoint until the end; tokens/s is
read from its metrics.jsonl after the warm-up windows.

Peer: the loop a researcher would write: Hugging Face ``GPT2LMHeadModel`` of the same shape,
torch AdamW (same betas, eps and weight-decay groups), gradient clipping at 1.0 and megagpt's LR
schedule, on the same global batches (read from the same GPT sample index), timed the same way.

Pairing (``--pairing``). ``lockstep`` (default): each round starts ``megagpt train`` and the
plain loop as two processes that take turns step by step: after each trainer step, its throughput
window paused, the trainer hands the machine to the peer and waits for the peer's step
(``LOCKSTEP_TRAIN``: ``megagpt train`` with only ``ThroughputWindow.pause`` extended). Neither
clock runs while the other side works, and load that comes and goes (this machine is a 2-vCPU VM
whose speed drifts by 10-15 % over tens of seconds) hits both sides alike; the round's ratio is
the median of the per-window ratios. ``blocks``: the whole trainer run, then the whole plain loop
in this process (the protocol of the earlier BENCHMARKS rows). Over rounds, the median of each
round's ratio. ``--clock cpu`` (for a shared machine, with ``--threads 1``) times both sides in
process CPU time instead of wall time (blocks: ``CPU_CLOCK_TRAIN``).

    python bench/trainer_e2e.py                       # CPU defaults
    python bench/trainer_e2e.py --steps 60 --rounds 3 --zero 0
    python bench/trainer_e2e.py --threads 1        # a shared machine: one thread each side
    python bench/trainer_e2e.py --pairing blocks   # one side after the other, per round
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
TOKENS_PER_STEP = 16 * 128  # global batch 16 of seq 128


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


class PlainLoop:
    """The peer: HF GPT-2 + torch AdamW + clipping + megagpt's LR schedule, same batches."""

    def __init__(self, args, tok: str, prefix: str):
        import torch
        from transformers import GPT2LMHeadModel

        from bench.peers import gpt2_config

        from megagpt.config import load_config
        from megagpt.data import build_gpt_datasets

        cfg = load_config(RECIPE, overrides(args, tok, prefix, Path(tempfile.mkdtemp())))
        m, o = cfg.model, cfg.optim
        m.vocab_size = 4096
        # The trainer's sample index (megagpt.training.trainer._build_data sizes it to the decay
        # horizon), so both sides read the same global batches in the same order.
        planned = max(args.steps * 16, math.ceil(o.decay_tokens / m.seq_length))
        self.ds, _, _ = build_gpt_datasets(
            [prefix],
            None,
            "100,0,0",
            m.seq_length,
            (planned, 0, 0),
            cfg.train.seed,
            tempfile.mkdtemp(),
        )
        torch.manual_seed(cfg.train.seed)
        hf = GPT2LMHeadModel(gpt2_config(m, vocab_size=4096))
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        self.hf = hf.to(dtype)
        decay = [p for n, p in hf.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in hf.named_parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": o.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
        )
        self.optim, self.seq = o, m.seq_length
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(self, step: int) -> float:
        """Global batch ``step``; its seconds on the loop's clock."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        from megagpt.training.schedules import learning_rate

        start = self.clock()
        batch = torch.from_numpy(
            np.stack([self.ds[step * 16 + i]["tokens"] for i in range(16)]).astype(np.int64)
        )
        for g in self.opt.param_groups:
            g["lr"] = learning_rate(self.optim, tokens=step * 16 * self.seq, step=step)
        logits = self.hf(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), self.optim.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer reads its loss every step too
        return self.clock() - start


def window_rates(seconds: list[float], window: int, tokens_per_step: int) -> list[float]:
    """tokens/s of each full ``window`` of step times, as the trainer's metrics log them."""
    return [
        window * tokens_per_step / sum(seconds[i : i + window])
        for i in range(0, len(seconds) - window + 1, window)
    ]


def peer_memory(args) -> None:
    """``--peer-memory keep``: the trainer's host-memory setting for the peer's process too."""
    if args.peer_memory == "keep":
        import torch

        from megagpt.training.host_memory import keep_freed_memory

        print(keep_freed_memory(torch.device("cpu"), True), file=sys.stderr)


def plain_loop_tokens_per_s(args, tok: str, prefix: str) -> float:
    peer_memory(args)  # process-wide: from here on for every round
    loop = PlainLoop(args, tok, prefix)
    seconds = [loop.step(i) for i in range(args.steps)]
    return statistics.median(
        window_rates(seconds, args.window, 16 * loop.seq)[args.warmup_windows :]
    )


# `megagpt train` that hands the machine to the peer after every step: ThroughputWindow.pause
# (the step's clock already stopped) writes to the peer and waits for its step to end, so the
# two alternate step by step and neither's clock runs while the other works. The peer's
# readiness is awaited before the first step.
LOCKSTEP_TRAIN = (
    "import os, sys, time\n"
    "import megagpt.training.trainer as trainer\n"
    "from megagpt.training.metrics import ThroughputWindow\n"
    "go, done = (int(x) for x in os.environ['E2E_LOCKSTEP_FDS'].split(','))\n"
    "clock = time.process_time if os.environ['E2E_CLOCK'] == 'cpu' else time.perf_counter\n"
    "class Lockstep(ThroughputWindow):\n"
    "    def __init__(self):\n"
    "        super().__init__(clock=clock)\n"
    "        assert os.read(done, 1) == b'r', 'the peer did not start'\n"
    "    def pause(self, tokens):\n"
    "        super().pause(tokens=tokens)\n"
    "        os.write(go, b'g')\n"
    "        assert os.read(done, 1) == b'd', 'the peer stopped'\n"
    "trainer.ThroughputWindow = Lockstep\n"
    "from megagpt.cli import main\n"
    "sys.argv[0] = 'megagpt'\n"
    "sys.exit(main())\n"
)


def peer_main(args) -> int:
    """The lockstep peer (``--peer GO,DONE``): one plain-loop step per byte read from GO, a byte
    back on DONE after each; at EOF, its step seconds as JSON on stdout."""
    go, done = (int(x) for x in args.peer.split(","))
    peer_memory(args)
    loop = PlainLoop(args, *args.data.split(","))
    os.write(done, b"r")
    seconds = []
    while os.read(go, 1) == b"g":
        seconds.append(loop.step(len(seconds)))
        os.write(done, b"d")
    print(json.dumps(seconds))
    return 0


def lockstep_round(args, tok: str, prefix: str, run_dir: Path) -> tuple[float, float, float]:
    """``megagpt train`` and the plain loop in two processes taking turns step by step; the
    medians (after warm-up) of each side's windowed tokens/s and of the per-window ratios."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    peer_args = [a for a in sys.argv[1:]] + [
        "--peer",
        f"{go_r},{done_w}",
        "--data",
        f"{tok},{prefix}",
    ]
    peer = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *peer_args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        pass_fds=(go_r, done_w),
    )
    try:
        trainer = subprocess.Popen(
            [sys.executable, "-c", LOCKSTEP_TRAIN, "train", "--config", str(RECIPE)]
            + overrides(args, tok, prefix, run_dir),
            env=dict(env, E2E_LOCKSTEP_FDS=f"{go_w},{done_r}", E2E_CLOCK=args.clock),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            pass_fds=(go_w, done_r),
        )
    finally:
        for fd in (go_r, go_w, done_r, done_w):  # each child holds its own ends now
            os.close(fd)
    if trainer.wait() != 0:
        peer.kill()
        raise SystemExit(f"megagpt train exited with {trainer.returncode}")
    out, _ = peer.communicate()
    if peer.returncode != 0:
        raise SystemExit(f"the plain-loop peer exited with {peer.returncode}")
    theirs = window_rates(json.loads(out), args.window, TOKENS_PER_STEP)
    ours = [
        json.loads(x)["tokens_per_s"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "tokens_per_s" in x
    ]
    if len(ours) != len(theirs):
        raise SystemExit(f"{len(ours)} megagpt windows but {len(theirs)} plain-loop windows")
    w = args.warmup_windows
    ratios = [a / b for a, b in zip(ours[w:], theirs[w:])]
    print("  windows (after warm-up): " + " ".join(f"{r:.2f}" for r in ratios), flush=True)
    return statistics.median(ours[w:]), statistics.median(theirs[w:]), statistics.median(ratios)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--window", type=int, default=10, help="steps per logged window")
    ap.add_argument("--warmup-windows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--pairing",
        default="lockstep",
        choices=["lockstep", "blocks"],
        help="lockstep: the two processes take turns step by step; blocks: the whole trainer "
        "run, then the whole plain loop, in each round",
    )
    ap.add_argument(
        "--peer-memory",
        default="system",
        choices=["system", "keep"],
        help="the plain loop's malloc: glibc's defaults (what a plain loop gets), or freed "
        "memory kept in the process as `megagpt train` keeps it (train.keep_freed_memory)",
    )
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)  # GO,DONE pipe fds
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)  # TOKENIZER,PREFIX
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
    if args.peer:
        return peer_main(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tok, prefix = prepare(Path(tmp))
        print(
            f"# bench/trainer_e2e.py {time.strftime('%Y-%m-%d')} {platform.machine()} "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, {args.precision}, zero {args.zero if args.zero is not None else 'default'}"
            f", {args.clock} clock, {args.pairing}, peer memory {args.peer_memory}, "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        ratios = []
        for r in range(args.rounds):
            run_dir = Path(tmp) / f"run{r}"
            if args.pairing == "lockstep":
                ours, theirs, ratio = lockstep_round(args, tok, prefix, run_dir)
            else:
                ours = megagpt_tokens_per_s(args, tok, prefix, run_dir)
                theirs = plain_loop_tokens_per_s(args, tok, prefix)
                ratio = ours / theirs
            ratios.append(ratio)
            print(
                f"round {r + 1}: megagpt train {ours:,.0f} tok/s | plain loop {theirs:,.0f} "
                f"tok/s | ratio {ratio:.2f} | load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        print(f"median ratio megagpt / plain loop: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
