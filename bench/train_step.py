"""Training-step throughput: megagpt vs a Hugging Face GPT2LMHeadModel of identical shape.

Both sides run forward + backward + AdamW step on the same token batches in the same process.
megagpt runs the trainer's path: megatron-core layers inside the DeepSpeed engine built from the
trainer's default config (ZeRO stage from ``parallel.zero_stage`` unless ``--zero`` sets it, the
trainer's bf16 DeepSpeed config, its matmul precision), once eager and once with the decoder
layers compiled (``train.compile=always``; ``--no-compile`` skips it); the peer is transformers'
GPT2LMHeadModel (eager) with torch AdamW. The sides alternate step by step after their warm-up
(the compiled side's includes its compilation, reported apart), so load that drifts hits all of
them; ``--clock cpu`` times process CPU time instead of wall time (for a shared machine, with
``--threads 1``). Both sides share this process's malloc: glibc's defaults, what a plain loop
gets, unless ``--keep-freed-memory`` gives the process (every side) the trainer's CPU setting
(``train.keep_freed_memory``; ``bench/trainer_e2e.py`` measures the trainer with it against a
peer without). Prints tokens/s for each and the ratios, plus model TFLOP/s and MFU on a GPU,
and there the allocator's peak (``torch.cuda.max_memory_allocated``) next to the planner's
prediction for the same layout.

``--micro auto`` takes the largest micro-batch of ``MICRO_CANDIDATES`` that fits on CUDA (tried
largest first; an out-of-memory frees everything and tries the next) and 4 on CPU.

    python bench/train_step.py                       # CPU defaults: mini and base shapes
    python bench/train_step.py --sizes gpt3-base --threads 1 --clock cpu   # a loaded machine
    python bench/train_step.py --sizes gpt3-base --hf-process --keep-freed-memory   # its malloc
    python bench/train_step.py --sizes gpt3-base --set train.cpu_matmul=blas   # torch's BLAS
    python bench/train_step.py --sizes gpt3-large gpt3-1.3b --seq 2048 --micro auto --precision bf16
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

MICRO_CANDIDATES = (16, 8, 4, 2, 1)
CPU_AUTO_MICRO = 4
T = TypeVar("T")


def largest_that_fits(
    candidates: Iterable[int],
    attempt: Callable[[int], T],
    is_oom: Callable[[BaseException], bool],
    cleanup: Callable[[], None] = lambda: None,
) -> tuple[int, T, list[int]]:
    """Run ``attempt(c)`` for each candidate, largest first, until one does not run out of
    memory; returns that candidate, its result and the candidates that did not fit.

    An exception for which ``is_oom`` is false propagates. ``cleanup`` runs after each failed
    attempt, once the exception (whose traceback holds the attempt's tensors) is dropped, so
    that the next attempt starts with the memory freed. Raises MemoryError when none fits.
    """
    failed: list[int] = []
    for c in sorted(set(candidates), reverse=True):
        try:
            return c, attempt(c), failed
        except BaseException as e:  # noqa: BLE001 -- filtered by is_oom, else re-raised
            if not is_oom(e):
                raise
        failed.append(c)
        cleanup()
    raise MemoryError(f"no candidate fits: tried {failed}")


def is_cuda_oom(e: BaseException) -> bool:
    """A CUDA allocation failure: the allocator's OutOfMemoryError, or a library (cuBLAS,
    NCCL, DeepSpeed) reporting it as a RuntimeError."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_model(cfg, device, dtype):
    from transformers import GPT2LMHeadModel

    from bench.peers import gpt2_config

    hc = gpt2_config(cfg)
    return GPT2LMHeadModel(hc).to(device=device, dtype=dtype)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def megagpt_config(size: str, args, micro: int, device, compile_mode: str):
    """The trainer's config for this benchmark's shape (validated as the trainer does)."""
    from megagpt.config import load_config, validate

    overrides = [
        f"model.name={size}",
        f"model.seq_length={args.seq}",
        "model.dropout=0",
        "model.attention_dropout=0",
        f"train.precision={args.precision}",
        f"train.micro_batch_size={micro}",
        f"train.compile={compile_mode}",
        f"train.global_batch_size={micro * args.accum}",
        "optim.lr=1e-4",
    ]
    if args.zero is not None:
        overrides.append(f"parallel.zero_stage={args.zero}")
    cfg = load_config(None, overrides + args.set)
    validate(cfg, 1, cuda=device.type == "cuda", need_data=False)
    return cfg


def build_megagpt(size: str, args, micro: int, device, compile_mode: str, ctx) -> dict:
    """The trainer's engine for ``size`` at ``micro`` (``train.compile=compile_mode``) and
    its global batch of random tokens (seeded: every side gets the same)."""
    import torch

    from megagpt.engine import Engine, build_model, deepspeed_zero_stage
    from megagpt.model import initialize_weights
    from megagpt.training.precision import configure_matmul_precision

    cfg = megagpt_config(size, args, micro, device, compile_mode)
    tf32 = configure_matmul_precision(device, cfg.train.tf32)  # as the trainer; HF runs under it
    module = build_model(cfg, ctx.dims, device)
    initialize_weights(module, cfg.model, 1, 0, 1)
    engine = Engine(cfg, module, ctx)
    tokens = hf_tokens(cfg, micro, args)
    batch = [
        {
            "tokens": tokens[i : i + micro, :-1],
            "labels": tokens[i : i + micro, 1:],
            "loss_mask": torch.ones(micro, args.seq),
        }
        for i in range(0, micro * args.accum, micro)
    ]
    return {
        "cfg": cfg,
        "engine": engine,
        "step": lambda: engine.train_step(batch),
        "zero": deepspeed_zero_stage(cfg, 1),
        "tokens": tokens,
        "tf32": tf32,
    }


def build_hf(cfg, tokens, micro: int, device, dtype):
    """The peer's step on the same tokens: GPT2LMHeadModel, torch AdamW, clipping at 1.0."""
    import torch

    hf = hf_model(cfg.model, device, dtype)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=device.type == "cuda")
    xs = [
        (tokens[i : i + micro, :-1].to(device), tokens[i : i + micro, 1:].to(device))
        for i in range(0, tokens.shape[0], micro)
    ]

    def hf_step():
        for x, y in xs:
            logits = hf(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / len(xs)).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return hf_step


def warm_up(step, n: int, sync) -> float:
    """``n`` steps; their wall seconds (a compiled side's include its compilation)."""
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - t


def alternate(steps: dict, iters: int, sync, clock) -> dict:
    """``iters`` rounds of one step per side in turn; the per-side step times (a side that
    returns a float timed itself: the HF side in its own process, ``--hf-process``)."""
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t = clock()
            out = step()
            sync()
            times[name].append(out if isinstance(out, float) else clock() - t)
    return times


def hf_tokens(cfg, micro: int, args):
    """The global batch every side trains on: seeded, so a worker process draws the same."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.model.vocab_size, (micro * args.accum, args.seq + 1), generator=gen)


def hf_worker(args) -> int:
    """``--hf-worker GO,DONE,SIZE,MICRO``: the HF side in its own process with glibc's default
    malloc. One step per byte read from GO; its seconds (on ``--clock``) back on DONE."""
    import struct

    import torch

    go, done, size, micro = args.hf_worker.split(",")
    go, done, micro = int(go), int(done), int(micro)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    cfg = megagpt_config(size, args, micro, cpu, "never")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    step, clock = build_hf(cfg, hf_tokens(cfg, micro, args), micro, cpu, dtype), CLOCKS[args.clock]
    while os.read(go, 1) == b"s":
        t = clock()
        step()
        os.write(done, struct.pack("d", clock() - t))
    return 0


def remote_hf(size: str, micro: int, args):
    """Start ``hf_worker`` for ``size``; returns (its step function, the process)."""
    import struct
    import subprocess

    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    argv = [a for a in sys.argv[1:] if a != "--hf-process"]
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *argv]
        + ["--hf-worker", f"{go_r},{done_w},{size},{micro}"],
        pass_fds=(go_r, done_w),
    )
    os.close(go_r)
    os.close(done_w)

    def step() -> float:
        os.write(go_w, b"s")
        got = os.read(done_r, 8)
        if len(got) != 8:
            raise RuntimeError(f"the HF worker process exited ({proc.wait()})")
        return struct.unpack("d", got)[0]

    def stop() -> None:
        os.close(go_w)
        os.close(done_r)
        proc.wait()

    return step, stop


# Kernel (CUDA) or operator (CPU) names by kind, first match wins; lower-cased substrings.
PROFILE_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("communication", ("nccl", "allreduce", "all_reduce", "gloo", "c10d")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    (
        "GEMM",
        (
            "gemm",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "linear_pointwise",
            "onednn_linear",
            "mkldnn",
        ),
    ),
    ("loss", ("softmax", "cross_entropy", "logsumexp", "nll_loss")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("elementwise", ("elementwise", "triton_", "gelu", "dropout")),
    ("copy / cast", ("copy", "memcpy", "memset", "fill", "cast")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in PROFILE_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_step(step, sync, cuda: bool, top: int = 8) -> dict:
    """One ``step`` under torch.profiler: its wall ms, the ms of GPU kernels (CUDA) or of
    operators' own CPU time (CPU) by kind (``PROFILE_KINDS``), and the ``top`` names. On CUDA,
    kernel time far under the wall time means the step waits on the host (launches, Python)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t
    by_name: dict[str, float] = {}
    for evt in prof.key_averages():
        if cuda:
            us = getattr(evt, "self_device_time_total", None)
            if us is None:  # older torch
                us = evt.self_cuda_time_total
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            by_name[evt.key] = by_name.get(evt.key, 0.0) + us / 1e3
    by_kind: dict[str, float] = {}
    for name, ms in by_name.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
    return {
        "wall_ms": wall * 1e3,
        "busy_ms": sum(by_name.values()),
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": sorted(by_name.items(), key=lambda kv: -kv[1])[:top],
        "what": "GPU kernels" if cuda else "operators' own CPU time",
    }


def format_profile(label: str, p: dict) -> list[str]:
    """``# profile`` lines of ``profile_step``'s result."""
    busy = p["busy_ms"]
    kinds = ", ".join(f"{k} {ms:,.0f} ms ({ms / busy:.0%})" for k, ms in p["by_kind"].items())
    lines = [
        f"# profile {label}: step {p['wall_ms']:,.0f} ms wall; {p['what']} {busy:,.0f} ms "
        f"({busy / p['wall_ms']:.0%} of it): {kinds}"
    ]
    for name, ms in p["top"]:
        lines.append(f"#   {ms:>9,.1f} ms  {name[:110]}")
    return lines


def run_size(size: str, args, micro: int, device, sync, dtype) -> dict:
    """Build megagpt eager (and compiled) and the HF peer for ``size``; time them in turn.

    On CUDA the peak memory is read after the eager engine's warm-up, before the other sides
    exist, so it is the trainer's alone (what the planner predicts)."""
    import torch

    from megagpt import parallel
    from megagpt.model.compile import compile_seconds

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ctx = parallel.initialize(megagpt_config(size, args, micro, device, "never").parallel, device)
    stop_hf = None
    try:
        eager = build_megagpt(size, args, micro, device, "never", ctx)
        steps = {"megagpt": eager.pop("step")}
        warm = {"megagpt": warm_up(steps["megagpt"], args.warmup, sync)}
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        if args.compile:
            steps["compiled"] = build_megagpt(size, args, micro, device, "always", ctx)["step"]
        stop_hf = None
        if args.hf_process:
            steps["HF"], stop_hf = remote_hf(size, micro, args)
        else:
            steps["HF"] = build_hf(eager["cfg"], eager["tokens"], micro, device, dtype)
        before = compile_seconds()
        for name in steps.keys() - {"megagpt"}:
            warm[name] = warm_up(steps[name], args.warmup, sync)
        compile_s = compile_seconds() - before
        times = alternate(steps, args.iters, sync, CLOCKS[args.clock])
        profiles = {}
        if args.profile:
            for name, step in steps.items():
                if not args.hf_process or name != "HF":
                    profiles[name] = profile_step(
                        step, sync, device.type == "cuda", top=args.profile_top
                    )
        del steps, eager["engine"]
    finally:
        if stop_hf is not None:
            stop_hf()
        parallel.destroy()
    return {
        **eager,
        "times": times,
        "warm": warm,
        "compile_s": compile_s,
        "peak": peak,
        "profiles": profiles,
    }


def planner_bytes(cfg, zero: int) -> float:
    """The planner's peak-stage prediction for this one-GPU run, without its CUDA context and
    NCCL reserve (which the allocator's peak does not see)."""
    from dataclasses import replace

    from megagpt.planner.memory import CUDA_RESERVE_BYTES, Layout, memory_per_stage, peak_stage

    layout = replace(Layout.from_config(cfg, 1), zero_stage=zero)  # the stage DeepSpeed runs
    stages = memory_per_stage(
        cfg.model,
        layout,
        precision=cfg.train.precision,
        global_batch=cfg.train.global_batch_size,
        flash=True,
        cuda=True,
    )
    return peak_stage(stages).total - CUDA_RESERVE_BYTES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["gpt3-mini", "gpt3-base"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--micro",
        default="auto",
        help=f"micro-batch size, or auto: the largest of {list(MICRO_CANDIDATES)} "
        f"that fits on CUDA, {CPU_AUTO_MICRO} on CPU",
    )
    ap.add_argument(
        "--accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step (the global batch is micro x accum)",
    )
    ap.add_argument(
        "--zero",
        type=int,
        choices=[0, 1, 2, 3],
        default=None,
        help="parallel.zero_stage (default: the config default, as the trainer)",
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the compiled megagpt side (train.compile=always)",
    )
    ap.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall time, or process CPU time (a shared machine; with --threads 1)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="the trainer's train.keep_freed_memory for this process, i.e. for every side "
        "(default: glibc's defaults, what a plain loop gets)",
    )
    ap.add_argument(
        "--hf-process",
        action="store_true",
        help="CPU: the HF side in its own process with glibc's default malloc, taking turns "
        "with this one step by step (with --keep-freed-memory: the trainer's setting here "
        "against a plain loop's)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra override of megagpt's config, e.g. train.cpu_matmul=blas",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the timing, one more step per side under torch.profiler: time by kind "
        "(GEMM, attention, optimizer, ...) of GPU kernels on CUDA, of operators on CPU",
    )
    ap.add_argument("--profile-top", type=int, default=8, help="--profile: how many names to list")
    ap.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile_top < 1:
        ap.error(f"--profile-top {args.profile_top}: expected a positive number of names")
    if args.micro != "auto" and not args.micro.isdigit():
        ap.error(f"--micro {args.micro!r}: expected a positive integer or auto")
    if args.hf_worker:
        sys.exit(hf_worker(args))

    import torch

    from megagpt import parallel
    from megagpt.model import padded_vocab_size
    from megagpt.training.metrics import device_peak_tflops, flops_per_token

    if args.threads:
        torch.set_num_threads(args.threads)
    device = parallel.resolve_device("auto")
    if args.hf_process and device.type != "cpu":
        ap.error("--hf-process: CPU only (a GPU's allocator is per process anyway)")
    if args.keep_freed_memory:
        from megagpt.training.host_memory import keep_freed_memory

        print(f"# {keep_freed_memory(device, True)}")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gpu = f"  {torch.cuda.get_device_name(device)}" if cuda else ""
    print(
        f"# bench/train_step.py  {time.strftime('%Y-%m-%d %H:%M')}  "
        f"{platform.processor() or platform.machine()} {os.cpu_count()} CPUs  device={device}"
        f"{gpu}  torch {torch.__version__}  threads={torch.get_num_threads()}  "
        f"precision={args.precision}  accum={args.accum}  clock={args.clock}  "
        f"{''.join(f'{kv}  ' for kv in args.set)}load {os.getloadavg()[0]:.1f}"
    )
    head = (
        f"{'size':<10} {'seq':>5} {'micro':>5} {'ZeRO':>4} {'megagpt tok/s':>14} "
        f"{'compiled tok/s':>14} {'HF tok/s':>10} {'eager/HF':>8} {'comp/HF':>7} "
        f"{'compile s':>9} {'TFLOP/s':>8} {'MFU':>6}"
    )
    if cuda:
        head += f" {'peak GiB':>8} {'planner GiB':>11} {'plan/peak':>9}"
    print(head, flush=True)
    if args.micro != "auto":
        candidates = [int(args.micro)]
    else:
        candidates = list(MICRO_CANDIDATES) if cuda else [CPU_AUTO_MICRO]
    for size in args.sizes:
        micro, ours, too_big = largest_that_fits(
            candidates,
            lambda m, s=size: run_size(s, args, m, device, sync, dtype),
            is_cuda_oom if cuda else (lambda e: False),
            free_cuda,
        )
        if too_big:
            print(
                f"# {size}: micro {too_big} ran out of memory (all sides in memory at once)",
                flush=True,
            )
        cfg = ours["cfg"]
        n_tok = micro * args.accum * args.seq
        tps = {name: n_tok / statistics.median(t) for name, t in ours["times"].items()}
        best = max(tps.get("compiled", 0.0), tps["megagpt"])
        fpt = flops_per_token(cfg.model, padded_vocab_size(cfg.model.vocab_size, 1), args.seq)
        tflops = fpt * best / 1e12
        peak = device_peak_tflops(
            device, args.precision, cfg.logging.peak_tflops, tf32=ours["tf32"]
        )
        mfu = f"{tflops / peak:6.1%}" if peak else "   n/a"
        comp = tps.get("compiled")
        comp_cols = (
            (f"{comp:>14,.0f}", f"{comp / tps['HF']:>7.2f}", f"{ours['compile_s']:>9.1f}")
            if comp
            else (f"{'-':>14}", f"{'-':>7}", f"{'-':>9}")
        )
        line = (
            f"{size:<10} {args.seq:>5} {micro:>5} {ours['zero']:>4} {tps['megagpt']:>14,.0f} "
            f"{comp_cols[0]} {tps['HF']:>10,.0f} {tps['megagpt'] / tps['HF']:>8.2f} "
            f"{comp_cols[1]} {comp_cols[2]} {tflops:>8.3f} {mfu}"
        )
        if cuda:
            pred = planner_bytes(cfg, ours["zero"])
            line += (
                f" {ours['peak'] / 2**30:>8.2f} {pred / 2**30:>11.2f} {pred / ours['peak']:>9.2f}"
            )
        print(line, flush=True)
        for name, p in ours["profiles"].items():
            print("\n".join(format_profile(f"{size} {name}", p)), flush=True)
        del ours
        free_cuda()
    print(
        f"# median of {args.iters} steps per side, sides alternating, after {args.warmup} "
        "warm-up steps each; compile s: torch.compile time (dynamo + inductor, forward and "
        f"backward) in the compiled side's warm-up; TFLOP/s and MFU of the faster megagpt "
        f"side; load at the end {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if cuda:
        print(
            "# peak GiB: torch.cuda.max_memory_allocated over megagpt's eager warm-up steps "
            "(reset per size, before the other sides are built); planner GiB: "
            "megagpt.planner.memory's peak stage for the same layout and the ZeRO "
            "stage DeepSpeed runs, minus its CUDA context/NCCL reserve",
            flush=True,
        )


if __name__ == "__main__":
    main()
