"""Training-step throughput: megagpt vs a Hugging Face GPT2LMHeadModel of identical shape.

Both sides run forward + backward + AdamW step on the same token batches in the same process.
megagpt runs its real path (megatron-core layers inside the DeepSpeed engine, ZeRO 0); the peer is
transformers' GPT2LMHeadModel with torch AdamW. Prints tokens/s for each and the ratio, plus model
TFLOP/s and MFU on a GPU.

    python bench/train_step.py                       # CPU defaults: mini and base shapes
    python bench/train_step.py --sizes gpt3-large gpt3-1.3b --seq 2048 --micro 4 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def hf_model(cfg, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    hc = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
                    n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                    n_inner=cfg.ffn, activation_function="gelu_new"
                    if cfg.activation == "gelu_tanh" else "gelu",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    layer_norm_epsilon=cfg.layernorm_eps, tie_word_embeddings=True)
    hc._attn_implementation = "sdpa"  # the same attention kernel megagpt uses
    return GPT2LMHeadModel(hc).to(device=device, dtype=dtype)


def time_steps(step, warmup: int, iters: int, sync) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["gpt3-mini", "gpt3-base"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    import torch

    from megagpt import parallel
    from megagpt.config import load_config
    from megagpt.engine import Engine, build_model
    from megagpt.model import initialize_weights, padded_vocab_size
    from megagpt.training.metrics import device_peak_tflops, flops_per_token

    device = parallel.resolve_device("auto")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"# bench/train_step.py  {time.strftime('%Y-%m-%d')}  {platform.processor() or ''} "
          f"{os.cpu_count()} CPUs  device={device}  torch {torch.__version__}  "
          f"threads={torch.get_num_threads()}  precision={args.precision}")
    print(f"{'size':<10} {'seq':>5} {'micro':>5} {'megagpt tok/s':>14} {'HF tok/s':>10} "
          f"{'ratio':>6} {'TFLOP/s':>8} {'MFU':>6}")
    for size in args.sizes:
        cfg = load_config(None, [f"model.name={size}", f"model.seq_length={args.seq}",
                                 "model.dropout=0", "model.attention_dropout=0",
                                 f"train.precision={args.precision}", "parallel.zero_stage=0",
                                 f"train.micro_batch_size={args.micro}",
                                 f"train.global_batch_size={args.micro}", "optim.lr=1e-4"])
        dims = parallel.initialize(cfg.parallel, device)
        module = build_model(cfg, dims)
        initialize_weights(module, cfg.model, 1, 0, 1)
        engine = Engine(cfg, module, dims, device)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.micro, args.seq + 1), generator=gen)
        batch = [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                  "loss_mask": torch.ones(args.micro, args.seq)}]
        ours = time_steps(lambda e=engine, b=batch: e.train_step(b), args.warmup, args.iters,
                          sync)

        hf = hf_model(cfg.model, device, dtype)
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=device.type == "cuda")
        x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

        def hf_step(hf=hf, opt=opt, x=x, y=y):
            logits = hf(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        theirs = time_steps(hf_step, args.warmup, args.iters, sync)
        n_tok = args.micro * args.seq
        ours_tps = n_tok / statistics.median(ours)
        hf_tps = n_tok / statistics.median(theirs)
        fpt = flops_per_token(cfg.model, padded_vocab_size(cfg.model.vocab_size, 1), args.seq)
        tflops = fpt * ours_tps / 1e12
        peak = device_peak_tflops(device, args.precision)
        mfu = f"{tflops / peak:6.1%}" if peak else "   n/a"
        print(f"{size:<10} {args.seq:>5} {args.micro:>5} {ours_tps:>14,.0f} {hf_tps:>10,.0f} "
              f"{ours_tps / hf_tps:>6.2f} {tflops:>8.3f} {mfu}", flush=True)
        del engine, module, hf, opt
        parallel.destroy()


if __name__ == "__main__":
    main()
