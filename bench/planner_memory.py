"""The planner's memory estimate against measured peaks of real CPU training steps, per layout.

    python bench/planner_memory.py                        # the whole grid (~10 min on 2 cores)
    python bench/planner_memory.py --sizes gpt3-tiny --precisions bf16 --markdown

For each size (gpt3-tiny, gpt3-mini), precision (fp32, bf16) and layout (TP 1-2, PP 1-2, DP 1-2,
ZeRO 0-3 where DeepSpeed's pipeline engine allows: ZeRO <= 1 with PP > 1), it runs two training
steps in gloo processes (``tools/probe_memory.py``: torch's CPU allocator peak, the analogue of
``torch.cuda.max_memory_allocated``) and prints the planner's estimate for the peak stage
(``megagpt.planner.memory``, no CUDA reserve, attention scores materialised as on CPU), the
measured peak over ranks, their ratio, the ratio with the planner's ZeRO buckets taken off both
sides (5e7-5e8 elements whatever the model: at these shapes they would hide the rest), and the
largest error of any one pipeline stage. Layouts of one world size share one set of
processes; a layout whose ratio comes out more than ``--recheck`` (10 %) off is measured again in
processes of its own and that figure kept, the shared run's shown beside it (a process that ran
other layouts can keep counting a block one of them freed on a gloo thread,
``tools/probe_memory.py``). The same model is checked against
``torch.cuda.max_memory_allocated`` on a GPU by ``bench/train_step.py`` (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.probe_memory import MIB, ProbeLayout, compare, launch  # noqa: E402

# (tp, pp, dp, zero): DP=1 rows run DeepSpeed's DP=1 rule whatever the ZeRO key (fp32: ZeRO 0,
# bf16: the BF16_Optimizer), so one of them per TP x PP; DP=2 rows cover ZeRO 0-3 (PP=2: 0-1).
LAYOUTS = [
    (1, 1, 1, 1),
    (2, 1, 1, 1),
    (1, 2, 1, 1),
    (2, 2, 1, 1),
    *[(1, 1, 2, z) for z in range(4)],
    *[(2, 1, 2, z) for z in range(4)],
    *[(1, 2, 2, z) for z in range(2)],
    *[(2, 2, 2, z) for z in range(2)],
]


def grid(
    sizes: list[str], precisions: list[str], micro: int, accum: int, max_world: int
) -> list[ProbeLayout]:
    """Every layout of the grid with ``tp * pp * dp <= max_world``."""
    return [
        ProbeLayout(size, prec, tp, pp, dp, z, micro, accum)
        for size in sizes
        for prec in precisions
        for tp, pp, dp, z in LAYOUTS
        if tp * pp * dp <= max_world
    ]


def run(
    layouts: list[ProbeLayout],
    save: Path | None = None,
    fresh: bool = False,
    recheck: float = 0.10,
) -> list[dict]:
    """Measure ``layouts`` (one launch per world size, or per layout when ``fresh``) and
    compare each with the planner; ``save`` receives the results so far after each world size
    (a long grid keeps them). A layout measured in shared processes whose ratio is off by more
    than ``recheck`` (0: never) is measured again alone; its result is the fresh one, with the
    shared run's ratio kept as ``shared_ratio``."""
    results = []
    for world in sorted({lay.world for lay in layouts}):
        batch = [lay for lay in layouts if lay.world == world]
        measured = [launch([lay])[0] for lay in batch] if fresh else launch(batch)
        for lay, ranks in zip(batch, measured, strict=True):
            r = compare(lay, ranks)
            print(f"# measured {r['layout']}: ratio {r['ratio']:.3f}", file=sys.stderr, flush=True)
            if not fresh and recheck > 0 and abs(r["ratio"] - 1) > recheck:
                shared = r["ratio"]
                r = compare(lay, launch([lay])[0])
                r["shared_ratio"] = shared
                print(
                    f"# measured {r['layout']} again in its own processes: ratio "
                    f"{r['ratio']:.3f} (shared: {shared:.3f})",
                    file=sys.stderr,
                    flush=True,
                )
            results.append(r)
        if save is not None:
            save.write_text(json.dumps(results, indent=1))
    order = {lay.name(): i for i, lay in enumerate(layouts)}
    return sorted(results, key=lambda r: order[r["layout"]])


def table(results: list[dict], markdown: bool) -> str:
    """The results as a fixed-width or Markdown table."""
    head = [
        "layout",
        "DeepSpeed",
        "planner MiB",
        "measured MiB",
        "planner/measured",
        "w/o buckets",
        "worst stage",
        "shared run",
    ]
    rows = [
        [
            r["layout"],
            f"stage {r['ds_stage']} {r['optimizer']}",
            f"{r['planned'] / MIB:.2f}",
            f"{r['measured'] / MIB:.2f}",
            f"{r['ratio']:.3f}",
            f"{r['without_buckets']:.3f}",
            f"{r['worst_stage_ratio'] * 100:.1f} %",
            f"{r['shared_ratio']:.3f}" if "shared_ratio" in r else "",
        ]
        for r in results
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *rows]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["gpt3-tiny", "gpt3-mini"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--micro", type=int, default=2, help="micro-batch size")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    ap.add_argument("--max-world", type=int, default=8, help="skip layouts with more ranks")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="new processes for every layout (slower: a process that ran other "
        "layouts can miscount a block freed on a gloo thread, see "
        "tools/probe_memory.py)",
    )
    ap.add_argument(
        "--recheck",
        type=float,
        default=0.10,
        help="measure a layout again in its own processes when its ratio in the shared ones "
        "is off by more than this (default 0.10; 0: never)",
    )
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path, help="also write every rank's figures here")
    a = ap.parse_args()
    start = time.time()
    load = os.getloadavg()
    if a.recheck < 0:
        ap.error(f"--recheck {a.recheck}: expected a fraction >= 0 (0: never)")
    layouts = grid(a.sizes, a.precisions, a.micro, a.accum, a.max_world)
    results = run(layouts, a.json, a.fresh, a.recheck)
    print(table(results, a.markdown))
    worst = max(abs(r["ratio"] - 1) for r in results)
    rest = max(abs(r["without_buckets"] - 1) for r in results)
    print(
        f"\n# {len(results)} layouts; largest |planner/measured - 1| = {worst * 100:.1f} % "
        f"({rest * 100:.1f} % without the ZeRO buckets); "
        f"{sum('shared_ratio' in r for r in results)} measured again alone; "
        f"load average {load[0]:.2f} -> {os.getloadavg()[0]:.2f}; "
        f"{time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
