"""Worker functions that inject real faults (a NaN loss, a NaN gradient, a NaN weight, a kill)
into training on every rank (see launcher.py); used by test_nonfinite.py."""

from __future__ import annotations

import os

import torch

from tests.distributed.workers import train_run

NAN = float("nan")


def _inject(engine, mode: str):
    """Make this step bad: ``loss`` (the model's output times NaN), ``grad`` (a finite loss,
    NaN in one parameter's gradient), ``weight`` (one weight set to NaN) or ``spike`` (the loss
    times 50). Returns a callable that removes the injection."""
    module = engine.ds.module
    if mode == "loss":
        return module.register_forward_hook(lambda m, i, out: out * NAN).remove
    if mode == "spike":  # a finite loss 50x too high (a bad batch), gradients clipped
        return module.register_forward_hook(lambda m, i, out: out * 50.0).remove
    first = next(p for p in module.parameters() if p.requires_grad)
    if mode == "grad":
        return first.register_hook(lambda g: g * NAN).remove
    if mode == "weight":
        with torch.no_grad():
            first.view(-1)[0] = NAN
        return lambda: None
    raise ValueError(mode)


def _masters(engine) -> list[torch.Tensor]:
    from megagpt.model.init import canonical_parameters

    return [engine.fp32_value(p).detach().clone() for _, p in canonical_parameters(engine.module)]


def engine_skip(overrides: list[str], mode: str, bad: int = 1, steps: int = 3) -> dict:
    """Train a tiny GPT ``steps`` steps with step ``bad`` (0-based) made non-finite by ``mode``.

    Returns each step's result and whether the fp32 masters and Adam step after each step equal
    those before it."""
    from megagpt import parallel
    from megagpt.config import load_config, validate
    from megagpt.engine import Engine, build_model
    from megagpt.model import initialize_weights

    cfg = load_config(
        None,
        [
            "model.name=gpt3-tiny",
            "model.dropout=0",
            "model.attention_dropout=0",
            "train.precision=fp32",
            "optim.schedule=constant",
            "optim.lr=1e-3",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            "model.seq_length=32",
            *overrides,
        ],
    )
    world = parallel.world_size_from_env()
    dev = torch.device("cpu")
    validate(cfg, world, cuda=False, need_data=False)
    ctx = parallel.initialize(cfg.parallel, dev)
    dims = ctx.dims
    module = build_model(cfg, dims, dev)
    initialize_weights(module, cfg.model, 1234, ctx.tp_rank, dims.tp)
    engine = Engine(cfg, module, ctx)
    gb, micro, seq = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.model.seq_length
    gen = torch.Generator().manual_seed(7)
    results = []
    for step in range(steps):
        data = torch.randint(0, cfg.model.vocab_size, (gb, seq + 1), generator=gen)
        share = gb // dims.dp
        mine = data[ctx.dp_rank * share : (ctx.dp_rank + 1) * share]
        mbs = [
            {
                "tokens": mine[i : i + micro, :-1],
                "labels": mine[i : i + micro, 1:],
                "loss_mask": torch.ones(micro, seq),
            }
            for i in range(0, share, micro)
        ]
        before, adam = _masters(engine), engine.optim_state.adam_step()
        remove = _inject(engine, mode) if step == bad else None
        out = engine.train_step(mbs)
        if remove:
            remove()
        after = _masters(engine)
        results.append(
            {
                **out,
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                "adam_step_unchanged": engine.optim_state.adam_step() == adam,
            }
        )
    parallel.destroy()
    return {"steps": results}


def _patch_train_step(mode: str, at: list[int], from_step: int = 0, kill_at: int = 0) -> None:
    """Every call of ``Engine.train_step`` (1-based count) in ``at``, or from ``from_step`` on,
    runs with ``mode`` injected; at call ``kill_at`` the process SIGKILLs itself first."""
    from megagpt.engine import engine as engine_module

    original = engine_module.Engine.train_step
    calls = {"n": 0}

    def train_step(self, micro_batches):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), 9)
        hit = calls["n"] in at or (from_step and calls["n"] >= from_step)
        remove = _inject(self, mode) if hit else None
        try:
            return original(self, micro_batches)
        finally:
            if remove:
                remove()

    engine_module.Engine.train_step = train_step


def cli_train_with_fault(
    config: str,
    overrides: list[str],
    mode: str = "loss",
    at: list[int] | None = None,
    from_step: int = 0,
    kill_at: int = 0,
) -> dict:
    """``megagpt train`` through the CLI's ``main`` with a fault injected (see
    ``_patch_train_step``); a non-zero exit status becomes this process's exit status."""
    from megagpt.cli import main

    _patch_train_step(mode, at or [], from_step, kill_at)
    code = main(["train", "--config", config, *overrides])
    if code:
        raise SystemExit(code)
    return {"code": code}


def train_killed_at(config: str, overrides: list[str], kill_at: int) -> dict:
    """``train_run`` that SIGKILLs itself at the start of step ``kill_at`` (a dead node)."""
    _patch_train_step("loss", [], 0, kill_at)
    return train_run(config, overrides)
