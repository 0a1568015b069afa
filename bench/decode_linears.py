"""The decoder's linears by row count, per weight layout: what ``decode.row_class`` decides on.

Times one pass of rows through every linear of a model size (QKV, attention output, fc1, fc2
per layer, then the output layer), as ``FastDecoder`` runs them, for each way of multiplying:

- ``linear``: ``F.linear`` on the model's own ``[out, in]`` weights (MKL);
- ``onednn``: oneDNN's packs made for 8 rows (``_linear_pointwise``);
- ``ours``: our kernel (``megagpt/model/kernels/cpu_decode.c``), where it builds.

The layouts alternate within each round (the machine's phases hit all alike); medians over the
rounds, and the implied weight streaming rate. Example:

    python bench/decode_linears.py --size gpt3-base --rows 1,2,3,4,8,16,24,32,64 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megagpt.config import from_name  # noqa: E402
from megagpt.model import cpu_kernels  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="gpt3-base")
    p.add_argument("--vocab", type=int, default=4096, help="output layer rows (padded vocab)")
    p.add_argument("--rows", default="1,2,3,4,8,16,24,32,64")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = from_name(args.size)
    h, f = cfg.hidden_size, cfg.ffn
    torch.manual_seed(0)
    shapes = [(3 * h, h), (h, h), (f, h), (h, f)] * cfg.num_layers + [(args.vocab, h)]
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    biases = [torch.randn(n) * 0.02 for n, _ in shapes[:-1]] + [None]
    nbytes = sum(w.numel() * 4 for w in weights)
    layouts = {
        "linear": None,
        "onednn": [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights],
    }
    if cpu_kernels.available():
        layouts["ours"] = [cpu_kernels.pack(w) for w in weights]
    else:
        print(f"cpu kernels: not available ({cpu_kernels.unavailable_reason()})")

    def run(name: str, m: int, inputs: dict[int, torch.Tensor]) -> None:
        packs = layouts[name]
        for i, (w, b) in enumerate(zip(weights, biases)):
            x = inputs[w.shape[1]]
            if packs is None:
                F.linear(x, w, b)
            elif name == "onednn":
                torch.ops.mkldnn._linear_pointwise.default(x, packs[i], b, "none", [], "")
            else:
                cpu_kernels.linear(x, packs[i], b)

    print(
        f"{args.size}: {len(weights)} linears, {nbytes / 1e6:.0f} MB of fp32 weights, "
        f"{torch.get_num_threads()} threads; ms per pass (GB/s of weights)"
    )
    print("| rows | " + " | ".join(layouts) + " |")
    print("|---:|" + "---:|" * len(layouts))
    for m in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(m, k) for k in {k for _, k in shapes}}
        times: dict[str, list[float]] = {name: [] for name in layouts}
        for _ in range(args.rounds + 1):  # the first round warms up, not counted
            for name in layouts:
                t = time.perf_counter()
                run(name, m, inputs)
                times[name].append(time.perf_counter() - t)
        cells = []
        for name in layouts:
            med = statistics.median(times[name][1:])
            cells.append(f"{med * 1e3:.1f} ({nbytes / med / 1e9:.1f})")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
