"""Decoding speed: megagpt's text-generation pipeline against Hugging Face ``generate``.

Both run the same weights: the HF model is a ``GPT2LMHeadModel`` built from the megagpt model
directory (Conv1D weights transposed to [in, out]; the fused QKV rows, interleaved per head in
megagpt, regrouped to GPT-2's all-Q | all-K | all-V; tanh GELU = ``gelu_new``). Both decode
greedily exactly ``--new-tokens`` tokens (no early stop) from the same prompts in the same
process, one prompt at a time and as one batch of equal-length prompts; the generated tokens are
compared as a parity check.

    python bench/generate.py --size gpt3-base --tokenizer TOKDIR --output BENCHMARKS-generate.md
    python bench/generate.py --model runs/x/model
    python bench/generate.py --device cuda --dtype bf16     # on a GPU (bench/gpu_check.sh)

Prompts (and the random model's tokenizer) come from the shared wiki corpus next to the checkout,
or from the bundled sample corpus where that is absent (a GPU machine with only the checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BUNDLED = Path(__file__).resolve().parents[1] / "megagpt" / "assets" / "sample_corpus.jsonl"


def corpus_texts() -> tuple[str, list[str]]:
    """(name, documents) of the shared wiki corpus, else of the bundled sample corpus."""
    wiki = SHARED / "corpus" / "wiki_cmrc2018.jsonl"
    path = wiki if wiki.is_file() else BUNDLED
    docs = [json.loads(x)["text"] for x in path.read_text("utf-8").splitlines() if x.strip()]
    return path.name, docs


def random_model_dir(size: str, tokenizer: str, out: str) -> str:
    """A model directory of a registered size with seeded random weights and ``tokenizer``."""
    from megagpt import parallel
    from megagpt.checkpoint import model_dir
    from megagpt.config import ParallelConfig, from_name
    from megagpt.data import build_tokenizer
    from megagpt.model import GPTModel, initialize_weights, megatron_config

    cfg = from_name(size)
    cfg.vocab_size = build_tokenizer(tokenizer).vocab_size
    parallel.initialize(ParallelConfig(backend="gloo"), torch.device("cpu"))
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()))
    initialize_weights(model, cfg, 1234, 0, 1)
    model_dir.save_tensors(out, model_dir.full_tensors(model, cfg))
    model_dir.write_config(out, cfg)
    model_dir.copy_tokenizer(out, tokenizer)
    return out


def to_gpt2(directory: str):
    """A transformers GPT2LMHeadModel holding the weights of a megagpt model directory."""
    from transformers import GPT2LMHeadModel

    from bench.peers import gpt2_config
    from megagpt.checkpoint import load_tensors, read_config

    cfg = read_config(directory)
    t = load_tensors(directory)
    h, nh, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    hf_cfg = gpt2_config(cfg)
    sd = {
        "transformer.wte.weight": t["embedding.word.word_embeddings.weight"],
        "transformer.wpe.weight": t["embedding.position.position_embeddings.weight"],
        "transformer.ln_f.weight": t["final_norm.final_layernorm.weight"],
        "transformer.ln_f.bias": t["final_norm.final_layernorm.bias"],
    }
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        qkv_w = t[p + "attention.query_key_value.weight"]  # [nh*3*hd, h], per-head q|k|v
        qkv_b = t[p + "attention.query_key_value.bias"]
        # [nh, 3, hd, h] -> [3, nh, hd, h] -> [3h, h]: all-Q | all-K | all-V rows
        qkv_w = qkv_w.view(nh, 3, hd, h).transpose(0, 1).reshape(3 * h, h)
        qkv_b = qkv_b.view(nh, 3, hd).transpose(0, 1).reshape(3 * h)
        sd.update(
            {
                q + "ln_1.weight": t[p + "input_layernorm.weight"],
                q + "ln_1.bias": t[p + "input_layernorm.bias"],
                q + "attn.c_attn.weight": qkv_w.t().contiguous(),  # Conv1D: [in, out]
                q + "attn.c_attn.bias": qkv_b,
                q + "attn.c_proj.weight": t[p + "attention.dense.weight"].t().contiguous(),
                q + "attn.c_proj.bias": t[p + "attention.dense.bias"],
                q + "ln_2.weight": t[p + "post_attention_layernorm.weight"],
                q + "ln_2.bias": t[p + "post_attention_layernorm.bias"],
                q + "mlp.c_fc.weight": t[p + "mlp.dense_h_to_4h.weight"].t().contiguous(),
                q + "mlp.c_fc.bias": t[p + "mlp.dense_h_to_4h.bias"],
                q + "mlp.c_proj.weight": t[p + "mlp.dense_4h_to_h.weight"].t().contiguous(),
                q + "mlp.c_proj.bias": t[p + "mlp.dense_4h_to_h.bias"],
            }
        )
    model = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 layout mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` tokens from the corpus (``corpus_texts``)."""
    out = []
    for text in corpus_texts()[1]:
        ids = tokenizer.encode(text)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise RuntimeError("not enough long documents for the prompts")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# bf16 keeps 8 significant bits: two logits closer than 2^-7 of the largest one are a tie that
# rounding in either side's kernels can break either way.
BF16_TIE = 2.0**-7


def parity(ours: list, theirs: list, prompt_lens: list[int], reference) -> str:
    """ "yes" when both sides' rows (prompt + new tokens) agree; else which rows part first, and
    how far apart the two choices' logits are there in float32 (``reference(ids)`` returns the
    last position's logits): a gap within bf16's resolution is a near tie, not a wrong kernel."""
    parted = [
        (next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))), a, b, n)
        for a, b, n in zip(ours, theirs, prompt_lens)
        if a != b
    ]
    if not parted:
        return "yes"
    k, a, b, n = min(parted, key=lambda d: d[0] - d[3])
    if k == min(len(a), len(b)):
        return f"no: {len(parted)} of {len(ours)} rows; row lengths differ ({len(a)} vs {len(b)})"
    logits = reference(a[:k]).float()
    gap = abs(logits[a[k]] - logits[b[k]]).item() / logits.abs().max().item()
    tie = ", a near tie at bf16 precision" if gap < BF16_TIE else ""
    best = int(logits.argmax())
    pick = {a[k]: "megagpt's", b[k]: "HF's"}.get(best, "neither side's")
    return (
        f"no: {len(parted)} of {len(ours)} rows; first at new token {k - n + 1}, where the two "
        f"choices' fp32 logits differ by {gap:.2%} of the largest{tie}; fp32 picks {pick}"
    )


def timed_pair(
    ours, theirs, repeats: int, clock=time.perf_counter
) -> tuple[float, object, float, object]:
    """Best times and results of two functions, run alternately (ours, theirs, ours, ...) after
    one warm-up each, so that a change in machine load hits both sides alike."""
    ours(), theirs()  # warm-up
    best = [float("inf"), float("inf")]
    results = [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((ours, theirs)):
            start = clock()
            results[i] = fn()
            best[i] = min(best[i], clock() - start)
    return best[0], results[0], best[1], results[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="megagpt model directory (default: a random --size model)")
    ap.add_argument("--size", default="gpt3-base", help="registered size for the random model")
    ap.add_argument(
        "--tokenizer",
        help="tokenizer for the random model (default: trained on 200 wiki articles, vocab 4096)",
    )
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs (best kept)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a "
        "shared machine with --threads 1; meaningless on CUDA)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="megagpt decodes with the static step under torch.compile (the "
        "warm-up run compiles; compile time is printed, not timed)",
    )
    ap.add_argument(
        "--lengths",
        default="",
        help="comma-separated new-token counts (e.g. 32,256,1024): also time one "
        "prompt at each, to show the cost per token does not grow with the length",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument(
        "--no-ragged",
        dest="ragged",
        action="store_false",
        help="skip the batch of prompts of different lengths",
    )
    ap.add_argument(
        "--reference",
        action="store_true",
        help="megagpt decodes with the reference loop (TextGenerator(fast=False): "
        "the model's own forward) instead of the fast path",
    )
    ap.add_argument(
        "--speculate",
        type=int,
        default=None,
        help="megagpt's guessed tokens per pass in greedy decoding (n-gram drafts; "
        "0 = one token per pass; default: the library's default)",
    )
    ap.add_argument(
        "--hf-lookup",
        type=int,
        default=10,
        help="also time HF generate with prompt_lookup_num_tokens=N (HF's own "
        "n-gram speculation; batch 1 only) as a second peer; 0 = skip",
    )
    ap.add_argument(
        "--beams",
        type=int,
        default=0,
        help="also time beam search with this many beams, one prompt at a time (megagpt "
        "num_beams against HF generate(num_beams, early_stopping='never')); 0 = skip",
    )
    ap.add_argument("--output", help="write a markdown report here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="weights and activations on both sides",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(0)

    from megagpt import pipeline
    from megagpt.inference.sampling import make_params

    tmp = tempfile.mkdtemp(prefix="megagpt-bench-")
    directory = args.model
    if directory is None:
        tok = args.tokenizer
        if tok is None:
            from megagpt.data import train_tokenizer

            docs = corpus_texts()[1][:200]
            tok = str(Path(tmp) / "tok")
            train_tokenizer(iter(docs), tok, vocab_size=4096)
        directory = random_model_dir(args.size, tok, str(Path(tmp) / "model"))
    pipe = pipeline("text-generation", model=directory, device=args.device, dtype=args.dtype)
    gen = pipe.generator
    gen.stop_ids = []  # exactly --new-tokens tokens on both sides
    if args.compile:
        gen.use_compiled_step()
    if args.reference:
        gen.fast = False
    if args.speculate is not None:
        gen.speculate = args.speculate
    device = next(gen.model.parameters()).device
    hf = to_gpt2(directory).to(
        device=device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = prompts(pipe.tokenizer, args.prompts, args.prompt_tokens)
    fp32_reference: list = []

    @torch.no_grad()
    def reference(row: list[int]) -> torch.Tensor:
        """The last position's logits of ``row`` in float32 (HF's model, upcast once)."""
        if not fp32_reference:
            fp32_reference.append(to_gpt2(directory).to(device=device, dtype=torch.float32))
        return fp32_reference[0](torch.tensor([row], device=device)).logits[0, -1]

    def same_tokens(out_ours, out_hf, batches) -> str:
        lens = [len(p) for batch in batches for p in batch]
        return parity(out_ours, out_hf, lens, reference)

    greedy = make_params(top_k=1)
    n = args.new_tokens
    rows = []

    passes = {"tokens": 0, "passes": 0, "guessed": 0, "kept": 0}

    def ours(batch, n=n):
        out = [c[0] for c in gen.generate(batch, greedy, max_new_tokens=n)]
        sync()
        st = gen.last_stats if gen.speculate else {}
        passes["tokens"] += n
        passes["passes"] += st.get("passes", n)
        passes["guessed"] += st.get("guessed", 0)
        passes["kept"] += st.get("kept", 0)
        return out

    def lookup_row(label, batches, n=n):
        """HF generate with prompt lookup (batch 1 only) against megagpt, same protocol."""

        @torch.no_grad()
        def hf_lookup(batch):
            x = torch.tensor(batch, device=device)
            out = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
                prompt_lookup_num_tokens=args.hf_lookup,
            )
            sync()
            return out.tolist()

        t_ours, out_ours, t_hf, out_hf = timed_pair(
            lambda: [r for x in batches for r in ours(x)],
            lambda: [r for x in batches for r in hf_lookup(x)],
            args.repeats,
            CLOCKS[args.clock],
        )
        tokens = n * sum(len(x) for x in batches)
        same = same_tokens(out_ours, out_hf, batches)
        print(
            f"{label}, HF with prompt lookup ({args.hf_lookup}): megagpt "
            f"{tokens / t_ours:.1f} tok/s | HF {tokens / t_hf:.1f} tok/s | identical: {same}",
            flush=True,
        )
        return (
            label + f", vs HF with `prompt_lookup_num_tokens={args.hf_lookup}`",
            tokens / t_ours,
            tokens / t_hf,
            same,
        )

    @torch.no_grad()
    def theirs(batch, n=n):
        # Prompts of different lengths: left-padded with an attention mask (HF's way); the
        # padding is cut from the returned rows.
        width = max(len(p) for p in batch)
        x = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = hf.generate(
            x,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )
        sync()
        return [row[width - len(p) :] for p, row in zip(batch, out.tolist())]

    # Ragged: the same passages cut to lengths from prompt-tokens/2 up (megagpt: one right-padded
    # prefill, per-row positions; HF: left padding and an attention mask).
    step = max(1, args.prompt_tokens // (2 * max(1, len(ids) - 1)))
    ragged = [p[: args.prompt_tokens // 2 + i * step] for i, p in enumerate(ids)]
    cases = [
        ("one prompt at a time (batch 1)", [[p] for p in ids]),
        (f"one batch of {len(ids)}", [ids]),
    ]
    if args.ragged and len(ids) > 1:
        cases.append(
            (
                f"one batch of {len(ids)}, prompts of {len(ragged[0])}-{len(ragged[-1])} tokens",
                [ragged],
            )
        )
    for label, batches in cases:
        if args.compile:  # one graph per batch size (dynamic=False): compile outside the timing
            start = time.perf_counter()
            ours(batches[0])
            print(
                f"compile for batch {len(batches[0])}: {time.perf_counter() - start:.1f} s",
                flush=True,
            )
        t_ours, out_ours, t_hf, out_hf = timed_pair(
            lambda b=batches: [r for x in b for r in ours(x)],
            lambda b=batches: [r for x in b for r in theirs(x)],
            args.repeats,
            CLOCKS[args.clock],
        )
        tokens = n * len(ids)
        same = same_tokens(out_ours, out_hf, batches)
        rows.append((label, tokens / t_ours, tokens / t_hf, same))
        print(
            f"{label}: megagpt {tokens / t_ours:.1f} tok/s | HF generate {tokens / t_hf:.1f} "
            f"tok/s | identical greedy tokens: {same}",
            flush=True,
        )
        if args.hf_lookup and all(len(x) == 1 for x in batches) and not args.reference:
            rows.append(lookup_row(label, batches))
    if args.beams:
        from megagpt.inference.beam import beam_search

        k = args.beams

        def ours_beams(batch):
            out = [beam_search(gen, p, num_beams=k, limit=len(p) + n)[0].ids for p in batch]
            sync()
            return out

        @torch.no_grad()
        def theirs_beams(batch):
            out = []
            for p in batch:
                row = hf.generate(
                    torch.tensor([p], device=device),
                    num_beams=k,
                    early_stopping="never",
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                out.append(row[0].tolist())
            sync()
            return out

        t_ours, out_ours, t_hf, out_hf = timed_pair(
            lambda: ours_beams(ids), lambda: theirs_beams(ids), args.repeats, CLOCKS[args.clock]
        )
        same = "yes" if out_ours == out_hf else "no"
        label = f"beam search, {k} beams, one prompt at a time (the best beam's tokens)"
        rows.append((label, n * len(ids) / t_ours, n * len(ids) / t_hf, same))
        print(
            f"{label}: megagpt {n * len(ids) / t_ours:.1f} tok/s | HF generate "
            f"{n * len(ids) / t_hf:.1f} tok/s | same best beam: {same}",
            flush=True,
        )
    length_rows = []
    for m in [int(x) for x in args.lengths.split(",") if x.strip()]:
        t_ours, out_ours, t_hf, out_hf = timed_pair(
            lambda m=m: ours(ids[:1], m),
            lambda m=m: theirs(ids[:1], m),
            args.repeats,
            CLOCKS[args.clock],
        )
        same = same_tokens(out_ours, out_hf, [ids[:1]])
        length_rows.append((m, m / t_ours, m / t_hf, same))
        print(
            f"{m} new tokens, batch 1: megagpt {m / t_ours:.1f} tok/s | HF generate "
            f"{m / t_hf:.1f} tok/s | identical greedy tokens: {same}",
            flush=True,
        )

    import transformers

    from megagpt.checkpoint import read_config

    cfg = read_config(directory)
    params = sum(p.numel() for p in hf.parameters())
    lines = [
        "# Generation speed: megagpt pipeline vs Hugging Face generate",
        "",
        f"Produced by `python bench/generate.py {' '.join(sys.argv[1:])}`.",
        "",
        (
            f"- model: {cfg.name or 'custom'} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_heads} heads, vocab {cfg.vocab_size}; {params / 1e6:.1f}M parameters), "
            f"{args.dtype} on {device}, "
            f"{'weights of ' + args.model if args.model else 'random weights'} (plain decoding's "
            f"speed does not depend on them; speculation's does: see the guesses kept below)"
            f"{'; megagpt compiled (static decode step, torch.compile)' if args.compile else ''}"
            f"{'; megagpt reference loop (fast=False)' if args.reference else ''}"
        ),
        (
            f"- prompts: {len(ids)} passages of {corpus_texts()[0]} of {args.prompt_tokens} "
            f"tokens; greedy, exactly {n} new tokens each, KV cache on both sides; best of "
            f"{args.repeats} timed runs after a warm-up, megagpt and HF alternating, "
            f"{args.clock} clock"
        ),
        (
            f"- machine: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
            f" ({platform.processor() or platform.machine()}), torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads, transformers "
            f"{transformers.__version__}; same process, same run; load average (1/5/15 min) "
            f"{'/'.join(f'{x:.1f}' for x in load_before)} before, "
            f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} after"
        ),
        "",
        "| decoding | megagpt pipeline (tok/s) | HF generate (tok/s) | ratio | same tokens |",
        "|---|---|---|---|---|",
    ]
    for label, a, b, same in rows:
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f} | {same} |")
    if length_rows:
        first = length_rows[0][1]
        lines += [
            "",
            f"Length sweep: one prompt of {args.prompt_tokens} tokens, batch 1, same "
            "protocol. A cost per token that does not grow with the length keeps tok/s "
            "flat.",
            "",
            "| new tokens | megagpt (tok/s) | vs the shortest | HF generate (tok/s) | ratio "
            "| same tokens |",
            "|---|---|---|---|---|---|",
        ]
        for m, a, b, same in length_rows:
            lines.append(f"| {m} | {a:.1f} | {a / first:.2f} | {b:.1f} | {a / b:.2f} | {same} |")
    if gen.speculate and passes["passes"]:
        lines += [
            "",
            (
                f"megagpt speculation (guessed tokens per pass <= {gen.speculate}): "
                f"{passes['tokens'] / passes['passes']:.2f} tokens per row and pass over "
                f"all timed and warm-up calls; {passes['kept']:,} of "
                f"{passes['guessed']:,} guesses kept "
                f"({passes['kept'] / max(passes['guessed'], 1):.0%})."
            ),
        ]
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
