"""The benchmarks' pairing of megagpt with its peer in two processes taking turns step by step:
bench/train_step.py --hf-process and bench/trainer_e2e.py's lockstep rounds (see
docs/training-speed.md); and bench/planner_memory.py measuring an outlier again in processes of
its own. They run for real here, briefly (the planner's launcher faked); the figures they print
are not checked (benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alternate_takes_the_seconds_a_self_timed_side_reports():
    ts = _bench("train_step")
    ticks = iter(range(100))
    times = ts.alternate(
        {"here": lambda: {"loss": 1.0}, "remote": lambda: 0.25},
        2,
        lambda: None,
        lambda: float(next(ticks)),
    )
    assert times == {"here": [1.0, 1.0], "remote": [0.25, 0.25]}


def test_window_rates_are_the_trainers_windows():
    te = _bench("trainer_e2e")
    assert te.window_rates([0.5, 0.5, 0.25, 0.25, 1.0], 2, 100) == [200.0, 400.0]


def _run(args: list[str], timeout: int) -> str:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_step_with_hf_in_its_own_process():
    out = _run(
        ["bench/train_step.py", "--sizes", "gpt3-mini", "--seq", "16", "--micro", "1"]
        + ["--warmup", "1", "--iters", "2", "--no-compile", "--hf-process"]
        + ["--set", "train.cpu_matmul=blas"],
        timeout=300,
    )
    assert "train.cpu_matmul=blas" in out.splitlines()[0]  # the override, in the header
    row = next(line for line in out.splitlines() if line.startswith("gpt3-mini"))
    ours, theirs = (float(x.replace(",", "")) for x in row.split()[4:7:2])
    assert ours > 0 and theirs > 0, row
    # --set reaches megagpt's config (validated like the trainer's)
    bad = subprocess.run(
        [sys.executable, "bench/train_step.py", "--sizes", "gpt3-mini", "--no-compile"]
        + ["--set", "train.cpu_matmul=mkl"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "train.cpu_matmul" in bad.stderr, bad.stderr[-2000:]


def test_trainer_e2e_lockstep_round():
    """`megagpt train` and the plain loop take turns: the same number of windows each (else the
    bench stops), one ratio per window after the warm-up one."""
    out = _run(
        ["bench/trainer_e2e.py", "--steps", "20", "--window", "10", "--rounds", "1"],
        timeout=600,
    )
    windows = re.search(r"windows \(after warm-up\): (.*)", out)
    assert windows and len(windows.group(1).split()) == 1, out
    assert re.search(r"round 1: megagpt train [\d,]+ tok/s \| plain loop [\d,]+ tok/s", out), out


def test_planner_memory_measures_an_outlier_again_in_its_own_processes(monkeypatch, capsys):
    pm = _bench("planner_memory")
    layouts = pm.grid(["gpt3-tiny", "gpt3-mini"], ["fp32", "bf16"], 2, 2, 1)[:3]  # world 1
    names = [lay.name() for lay in layouts]
    launches = []
    shared = {names[0]: 1.02, names[1]: 0.80, names[2]: 1.11}  # the last two off by > 10 %

    def launch(batch):
        launches.append([lay.name() for lay in batch])
        alone = len(batch) == 1 and len(launches) > 1
        return [[{"alone": alone}] for _ in batch]

    def compare(lay, ranks):
        ratio = 0.97 if ranks[0]["alone"] else shared[lay.name()]
        return {"layout": lay.name(), "ratio": ratio}

    monkeypatch.setattr(pm, "launch", launch)
    monkeypatch.setattr(pm, "compare", compare)
    results = pm.run(layouts)
    assert launches == [names, [names[1]], [names[2]]]
    assert [r["ratio"] for r in results] == [1.02, 0.97, 0.97]
    assert "shared_ratio" not in results[0]
    assert [r["shared_ratio"] for r in results[1:]] == [0.80, 1.11]

    launches.clear()
    assert [r["ratio"] for r in pm.run(layouts, recheck=0)] == [1.02, 0.80, 1.11]
    assert launches == [names]  # 0: never measured again
    launches.clear()
    pm.run(layouts, fresh=True)
    assert launches == [[n] for n in names]  # each alone already: nothing measured twice


def test_generation_parity_explains_where_rows_part():
    """bench/generate.py's token check: "yes" when the rows agree; else the first place they
    part, and whether the two choices were a near tie at bf16 precision (the first GPU run's
    bf16 rows parted after many tokens; fp32 rows on the CPU never did)."""
    import torch

    gen = _bench("generate")
    asked = []

    def reference(logits):
        def run(row):
            asked.append(list(row))
            return torch.tensor(logits)

        return run

    prompts = [[5, 6], [7]]
    same = [[5, 6, 1, 2], [7, 3, 3]]
    assert gen.parity(same, [list(r) for r in same], [2, 1], reference([0.0])) == "yes"
    assert not asked  # no reference pass when nothing differs

    other = [[5, 6, 1, 2], [7, 3, 4]]  # row 1 parts at its second new token
    tie = gen.parity(same, other, [len(p) for p in prompts], reference([0.0, 1, 9, 10.0, 10.01]))
    assert asked == [[7, 3]]  # the common prefix
    assert tie.startswith("no: 1 of 2 rows; first at new token 2")
    assert "0.10% of the largest" in tie and "near tie" in tie
    assert tie.endswith("fp32 picks HF's")  # logit 10.01 (HF's token 4) over 10.0

    far = gen.parity(same, other, [2, 1], reference([0.0, 1, 9, 10.0, 2.0]))
    assert "80.00% of the largest" in far and "near tie" not in far
    assert far.endswith("fp32 picks megagpt's")
