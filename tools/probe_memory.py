#!/usr/bin/env python
"""Measure the tensor memory of real CPU training steps and set it next to the planner's estimate.

    python tools/probe_memory.py --size gpt3-tiny --precision bf16 --tp 2 --pp 1 --dp 2 --zero 2
    python tools/probe_memory.py --size gpt3-mini --pp 2 --dp 2 --zero 1 --json

Starts ``tp * pp * dp`` local gloo processes (torchrun-style environment), each building the
trainer's own engine (``megagpt.engine.build_model`` + ``Engine``, the DeepSpeed optimizer wrapper
the config selects) and running two optimizer steps on synthetic tokens; prints, per rank, the
measured peak next to ``megagpt.planner.memory``'s estimate for that rank's pipeline stage.

What is measured, and why this way: the bytes live in torch's CPU allocator, read from the
profiler's allocation records (``torch.profiler.profile(profile_memory=True)``; every allocation
and free through c10's CPU allocator carries the allocator's running total). That is the CPU
analogue of ``torch.cuda.max_memory_allocated``, which the GPU benchmark compares with
(``bench/train_step.py``): it counts exactly the tensors the model, the optimizer and DeepSpeed
allocate, their temporaries and autograd's saved tensors included, and nothing else. Process RSS
(what this tool read before) also counts the Python heap, the libraries, allocator arenas and
pages never returned, which at tiny shapes dwarf the model; a ``TorchDispatchMode`` would miss
allocations made inside C++ (DeepSpeed's flattening, gloo's staging tensors, autograd's
accumulation). The profiler starts after the process groups exist and before the model is built,
so the running total is the memory of the training run alone; the reported peak is the largest
total inside the two steps (the steady state: step 1 creates the optimizer state), and the
phases give the components: weights after the build, what the engine's initialisation adds
(DeepSpeed's flat copies), what persists after a step (optimizer state, gradient buffers), and
the transient peak of a step over what was live before it (activations, logits, buckets).

One limit: the profiler records allocations and frees only on the threads it listens to, and a
tensor whose last reference dies on a gloo worker thread is freed there. The count corrects for
that when the address is handed out again; otherwise the block stays counted. Fresh processes
per layout (``launch([layout])``, ``bench/planner_memory.py --fresh``) keep such leftovers of one
layout from inflating the next.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


@dataclass(frozen=True)
class ProbeLayout:
    """One measured run: model size, precision and parallel layout (DP included)."""

    size: str
    precision: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 1
    micro: int = 2
    accum: int = 2
    seq: int = 0  # 0: the size's own seq_length

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def name(self) -> str:
        seq = f" seq{self.seq}" if self.seq else ""
        return (
            f"{self.size.removeprefix('gpt3-')} {self.precision} TP{self.tp} PP{self.pp} "
            f"DP{self.dp} Z{self.zero} mb{self.micro}x{self.accum}{seq}"
        )

    def overrides(self) -> list[str]:
        """The config keys of this run (dropout off: masks are modelled, but the quickstart
        sizes train with it off and the planner's grid compares like with like)."""
        out = [
            f"model.name={self.size}",
            "model.dropout=0",
            "model.attention_dropout=0",
            f"train.precision={self.precision}",
            f"parallel.tensor={self.tp}",
            f"parallel.pipeline={self.pp}",
            f"parallel.zero_stage={self.zero}",
            f"train.micro_batch_size={self.micro}",
            f"train.global_batch_size={self.micro * self.accum * self.dp}",
            "optim.schedule=constant",
            "optim.lr=1e-4",
        ]
        if self.seq:
            out += [f"model.seq_length={self.seq}"]
        return out


# -- one rank ---------------------------------------------------------------------------------


def _allocation_events(prof) -> list[tuple[int, int, int]]:
    """(time ns, bytes, address) of every CPU allocation (bytes > 0) and free (< 0), in the
    order they happened. The profiler's clock often gives an allocation and its free the same
    nanosecond, so ties keep the event tree's own order (a pre-order walk, children in
    sequence): sorting on time alone could put a free before its allocation and leak it."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, int, int]] = []
    stack = list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:
        e = stack.pop()
        stack.extend(reversed(e.children))
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            f = e.extra_fields
            events.append((e.start_time_ns, len(events), f.alloc_size, f.ptr))
    events.sort()
    return [(t, size, ptr) for t, _, size, ptr in events]


def live_curve(events: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(time ns, bytes live) after each of ``events`` ((time, bytes, address), in order; bytes
    < 0 a free), counting only what the window itself allocated.

    The running total is recomputed here rather than read from the allocator's
    ``total_allocated``: that counter is process-wide, so a block that an earlier window
    allocated and this one frees (a previous layout's tensors, collected late) would be
    subtracted from memory this window never counted."""
    out, live, sizes = [], 0, {}
    for t, size, ptr in events:
        if size > 0:
            # An address handed out again was freed in between: on a thread the profiler does
            # not listen to (the last reference to an async collective's buffer can die on a
            # gloo worker; torch 2.13's ``profile_all_threads`` records no allocations at all).
            live += size - sizes.get(ptr, 0)
            sizes[ptr] = size
        elif ptr in sizes:
            live -= sizes.pop(ptr)
        else:
            continue  # allocated before this window
        out.append((t, live))
    return out


def _allocations(prof) -> list[tuple[int, int]]:
    """``live_curve`` of the profiled window's CPU allocations and frees."""
    return live_curve(_allocation_events(prof))


def _live_blocks(prof, at: int) -> list[int]:
    """Sizes of the blocks live at time ``at`` (largest first): what a peak is made of."""

    sizes: dict[int, int] = {}
    for t, size, ptr in _allocation_events(prof):
        if t > at:
            break
        if size > 0:
            sizes[ptr] = size
        else:
            sizes.pop(ptr, None)
    return sorted(sizes.values(), reverse=True)


def _ranges(prof, names: set[str]) -> dict[str, tuple[int, int]]:
    """Start and end (ns) of the ``record_function`` ranges named ``names``."""
    out, stack = {}, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.name in names:
            out[e.name] = (e.start_time_ns, e.end_time_ns)
    return out


def _live_at(allocs: list[tuple[int, int]], t: int) -> int:
    """The allocator total just before time ``t``."""
    live = 0
    for ts, total in allocs:
        if ts >= t:
            break
        live = total
    return live


def _peak_in(allocs: list[tuple[int, int]], start: int, end: int) -> int:
    return max(
        (total for ts, total in allocs if start <= ts <= end), default=_live_at(allocs, start)
    )


def _rendezvous_port(directory: str, index: int) -> int:
    """The port of layout ``index``'s process group: rank 0 picks a free one just before it
    listens and leaves it in ``directory``; the other ranks wait for it. (Ports picked once by
    the launcher were taken by other programs during a long grid.)"""
    path = Path(directory) / f"port{index}"
    if dist_rank() == 0:
        (port,) = _free_ports(1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.rename(path)  # atomic: a reader never sees a half-written number
        return port
    deadline = time.monotonic() + 600
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: rank 0 never published the rendezvous port")
        time.sleep(0.05)
    return int(path.read_text())


def measure_rank(layout: dict, port: int) -> dict:
    """Run one layout on this rank (the launcher's environment) and return its figures."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from megagpt import parallel
    from megagpt.config import load_config, validate
    from megagpt.engine import Engine, build_model, deepspeed_zero_stage
    from megagpt.model import initialize_weights

    lay = ProbeLayout(**layout)
    os.environ["MASTER_PORT"] = str(port)
    cfg = load_config(None, lay.overrides())
    world = parallel.world_size_from_env()
    device = torch.device("cpu")
    validate(cfg, world, cuda=False, need_data=False)
    ctx = parallel.initialize(cfg.parallel, device)
    dims = ctx.dims
    seq, micro = cfg.model.seq_length, cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(2):  # the same tokens on every rank; each DP rank takes its share
        data = torch.randint(
            0, cfg.model.vocab_size, (lay.micro * lay.accum, seq + 1), generator=gen
        )
        steps.append(
            [
                {
                    "tokens": data[i : i + micro, :-1],
                    "labels": data[i : i + micro, 1:],
                    "loss_mask": torch.ones(micro, seq),
                }
                for i in range(0, lay.micro * lay.accum, micro)
            ]
        )
    torch.manual_seed(0)
    marks = ("probe/build", "probe/engine", "probe/step1", "probe/step2")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function(marks[0]):
            module = build_model(cfg, dims, device)
            initialize_weights(module, cfg.model, 0, ctx.tp_rank, dims.tp)
        with record_function(marks[1]):
            engine = Engine(cfg, module, ctx)
        for mark, batch in zip(marks[2:], steps, strict=True):
            # Garbage in reference cycles (autograd graphs, DeepSpeed closures) is freed when
            # Python's collector happens to run; collecting here makes the figures repeatable.
            gc.collect()
            with record_function(mark):
                engine.train_step(batch)
    allocs = _allocations(prof)
    detail = {}
    if os.environ.get("PROBE_DETAIL"):
        s2_ = _ranges(prof, {marks[3]})[marks[3]]
        t_peak = max((x for x in allocs if s2_[0] <= x[0] <= s2_[1]), key=lambda x: x[1])[0]
        detail = {
            "at_peak": _live_blocks(prof, t_peak)[:40],
            "after": _live_blocks(prof, s2_[1])[:40],
        }
    at = _ranges(prof, set(marks))
    build_end, engine_end = at[marks[0]][1], at[marks[1]][1]
    s1, s2 = at[marks[2]], at[marks[3]]
    before2 = _live_at(allocs, s2[0])
    peak = max(_peak_in(allocs, *s1), _peak_in(allocs, *s2))
    out = {
        "layout": layout,
        "rank": dist_rank(),
        "stage": ctx.pp_rank,
        "tp_rank": ctx.tp_rank,
        "dp_rank": ctx.dp_rank,
        "ds_stage": deepspeed_zero_stage(cfg, world),
        "optimizer": type(engine.ds.optimizer).__name__,
        "weights": _live_at(allocs, build_end),
        "after_init": _live_at(allocs, engine_end),
        "after_step": before2,
        "peak": peak,
        "step_peak": _peak_in(allocs, *s2),
        "build_peak": _peak_in(allocs, at[marks[0]][0], engine_end),
        **detail,
    }
    del engine, module, prof
    gc.collect()
    parallel.destroy()
    return out


def dist_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def measure_rank_all(layouts: list[dict], rendezvous: str) -> list[dict]:
    """``measure_rank`` for each layout in turn: one process-group start per layout, each on
    a fresh port (``_rendezvous_port``), so a closing store never races the next rendezvous."""
    return [measure_rank(lay, _rendezvous_port(rendezvous, i)) for i, lay in enumerate(layouts)]


# -- the launcher -----------------------------------------------------------------------------

_BOOT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
from tools.probe_memory import measure_rank_all
result = measure_rank_all(**json.loads(sys.argv[2]))
with open(sys.argv[3], "w") as f:
    json.dump(result, f)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(layouts: list[ProbeLayout], timeout: float = 600.0) -> list[list[dict]]:
    """Measure ``layouts`` (all of one world size) in one set of gloo processes; returns, per
    layout, every rank's figures."""
    if not layouts:
        return []
    world = layouts[0].world
    if any(lay.world != world for lay in layouts):
        raise ValueError("launch: every layout of one launch must have the same world size")
    with tempfile.TemporaryDirectory() as tmp:
        args = json.dumps({"layouts": [lay.__dict__ for lay in layouts], "rendezvous": tmp})
        procs = []
        for rank in range(world):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                OMP_NUM_THREADS="1",
                WANDB_MODE="disabled",
            )
            log = open(Path(tmp) / f"rank{rank}.log", "w")
            procs.append(
                (
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            _BOOT,
                            str(ROOT),
                            args,
                            str(Path(tmp) / f"{rank}.json"),
                        ],
                        env=env,
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
        failed = []
        try:
            for rank, (p, log) in enumerate(procs):
                try:
                    code = p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    code = "timeout"
                    for q, _ in procs:
                        q.kill()
                log.close()
                if code != 0:
                    text = (Path(tmp) / f"rank{rank}.log").read_text()[-3000:]
                    failed.append(f"rank {rank} exited {code}:\n{text}")
        finally:  # interrupted (^C, a test timeout): no rank outlives the launcher
            for q, _ in procs:
                if q.poll() is None:
                    q.kill()
        if failed:
            raise RuntimeError("probe_memory: " + "\n\n".join(failed))
        per_rank = [json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(world)]
    return [[per_rank[r][i] for r in range(world)] for i in range(len(layouts))]


# -- the planner's side -----------------------------------------------------------------------


def planner_stages(lay: ProbeLayout):
    """The planner's per-stage breakdowns for ``lay`` on CPU (no CUDA reserve, no flash)."""
    from megagpt.config import load_config
    from megagpt.planner.memory import Layout, memory_per_stage

    cfg = load_config(None, lay.overrides())
    layout = Layout.from_config(cfg, lay.world)
    return memory_per_stage(
        cfg.model,
        layout,
        precision=cfg.train.precision,
        global_batch=cfg.train.global_batch_size,
        flash=False,
        cuda=False,
    )


def compare(lay: ProbeLayout, ranks: list[dict]) -> dict:
    """Measured peak (the largest rank) against the planner's peak stage, and each stage."""
    stages = planner_stages(lay)
    worst = max(ranks, key=lambda r: r["peak"])
    per_stage = {}
    for r in ranks:
        m = per_stage.setdefault(r["stage"], {"measured": 0, "planned": stages[r["stage"]].total})
        m["measured"] = max(m["measured"], r["peak"])
    planned = max(b.total for b in stages)
    # The planner's buckets taken off both sides: the check of everything else, which the
    # buckets (5e7-5e8 elements whatever the model) would otherwise hide at tiny shapes.
    bucket = stages[worst["stage"]].buffers
    rest = (stages[worst["stage"]].total - bucket) / (worst["peak"] - bucket)
    return {
        "layout": lay.name(),
        "measured": worst["peak"],
        "planned": planned,
        "ratio": planned / worst["peak"],
        "without_buckets": rest,
        "optimizer": worst["optimizer"],
        "ds_stage": worst["ds_stage"],
        "stages": per_stage,
        "worst_stage_ratio": max(abs(v["planned"] / v["measured"] - 1) for v in per_stage.values()),
        "ranks": ranks,
        "breakdown": {k: v for k, v in vars(stages[worst["stage"]]).items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="gpt3-tiny")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    for key, default in (
        ("tp", 1),
        ("pp", 1),
        ("dp", 1),
        ("zero", 1),
        ("micro", 2),
        ("accum", 2),
        ("seq", 0),
    ):
        ap.add_argument(f"--{key}", type=int, default=default)
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = ap.parse_args(argv)
    lay = ProbeLayout(a.size, a.precision, a.tp, a.pp, a.dp, a.zero, a.micro, a.accum, a.seq)
    result = compare(lay, launch([lay])[0])
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"{result['layout']}: DeepSpeed stage {result['ds_stage']} ({result['optimizer']})")
    for r in result["ranks"]:
        print(
            f"  rank {r['rank']} (stage {r['stage']}): weights {r['weights'] / MIB:.2f} MiB, "
            f"after init {r['after_init'] / MIB:.2f}, after a step {r['after_step'] / MIB:.2f},"
            f" peak {r['peak'] / MIB:.2f}"
        )
    print(
        f"  planner {result['planned'] / MIB:.2f} MiB, measured {result['measured'] / MIB:.2f}"
        f" MiB, ratio {result['ratio']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
