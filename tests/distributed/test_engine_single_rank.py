"""The engine at data-parallel size 1 pays for nothing it does not use, and computes the same
step: no gradient all-reduce over a group of one, fused AdamW, a grad norm of one BLAS dot
per gradient on CPU.

A distributed test although it runs in this process: the engine (DeepSpeed, megatron-core's
layers) needs a process group even for one rank, so each test holds a single-process gloo group.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.local_group import _LocalGroup


def _config(*overrides: str):
    """A validated config of a small gpt3-tiny for one process (fp32, micro-batch 2, lr 1e-3;
    ``overrides`` on top)."""
    from megagpt.config import load_config, validate

    cfg = load_config(
        None,
        [
            "model.name=gpt3-tiny",
            "model.num_layers=2",
            "model.dropout=0",
            "model.attention_dropout=0",
            "train.precision=fp32",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "optim.lr=1e-3",
            *overrides,
        ],
    )
    validate(cfg, 1, cuda=False, need_data=False)
    return cfg


def _engine(cfg, ctx, check=None):
    """The training engine of ``cfg`` on ``ctx``, weights seeded alike every time
    (``check(module)`` runs on the model before it goes into the engine)."""
    from megagpt.engine import Engine, build_model
    from megagpt.model import initialize_weights

    module = build_model(cfg, ctx.dims, ctx.device)
    if check is not None:
        check(module)
    initialize_weights(module, cfg.model, 3, 0, 1)
    return Engine(cfg, module, ctx)


@pytest.fixture(scope="module")
def engine():
    cfg = _config("optim.clip_grad=0.05")
    with _LocalGroup() as group:
        yield _engine(cfg, group.ctx), cfg


def _batch(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=g)
    return [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(2, 32)}]


def test_plain_step_at_dp1_does_not_all_reduce_and_matches_torch(engine, monkeypatch):
    """The step at DP=1 skips DeepSpeed's bucketed all-reduce (flatten, reduce over one rank,
    copy back), yet equals a plain torch step: clip by the global norm, AdamW."""
    eng, cfg = engine

    def no_reduce(*a, **k):
        raise AssertionError("gradients all-reduced over a data-parallel group of one")

    monkeypatch.setattr(eng.ds, "allreduce_gradients", no_reduce)
    params = list(eng.module.parameters())
    batch = _batch(cfg, 0)
    # The reference: the same loss and gradients, then clip and torch AdamW on copies.
    loss = eng.module(batch[0]["tokens"], batch[0]["labels"], batch[0]["loss_mask"])
    loss.backward()
    ref = [p.detach().clone().requires_grad_() for p in params]
    for p, r in zip(params, ref):
        r.grad, p.grad = p.grad, None
    norm = torch.nn.utils.clip_grad_norm_(ref, cfg.optim.clip_grad)
    groups = [
        {
            "params": [r for p, r in zip(params, ref) if p.ndim >= 2],
            "weight_decay": cfg.optim.weight_decay,
        },
        {"params": [r for p, r in zip(params, ref) if p.ndim < 2], "weight_decay": 0.0},
    ]
    torch.optim.AdamW(
        groups, lr=1e-3, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps
    ).step()
    eng.set_lr(1e-3)
    out = eng.train_step(batch)
    assert out["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert out["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-7)
    assert eng.ds.optimizer.defaults["fused"]  # torch's fused AdamW on CPU too


@pytest.mark.slow  # one inductor compile of the decoder layer
def test_the_cpu_grad_norm_reads_each_gradient_once_with_the_blas_dot(engine):
    """On a CPU the plain path's grad norm is one BLAS dot product per gradient (about twice
    the rate of torch's norm kernels there), and it equals the fp64 norm."""
    from torch.utils._python_dispatch import TorchDispatchMode

    eng, cfg = engine
    batch = _batch(cfg, 5)
    eng.module.zero_grad(set_to_none=True)
    eng.module(batch[0]["tokens"], batch[0]["labels"], batch[0]["loss_mask"]).backward()
    grads = [p.grad for p in eng.module.parameters() if p.grad is not None]
    calls: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            calls[name] = calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        norm = eng._plain_grad_norm()
    eng.module.zero_grad(set_to_none=True)
    exact = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt()
    assert float(norm) == pytest.approx(float(exact), rel=1e-6)
    assert calls.get("dot") == len(grads), calls
    assert not {"_foreach_norm", "linalg_vector_norm", "norm"} & calls.keys(), calls


def test_first_compiled_step_reports_its_compile_time():
    """train.compile=always: the first step says how long torch.compile took (the trainer logs
    it and writes it to metrics.jsonl); later steps do not."""
    cfg = _config("model.num_layers=1", "train.compile=always")

    def compiled(module):
        assert module.layers[0]._compiled is not None

    with _LocalGroup() as group:
        torch._dynamo.reset()
        eng = _engine(cfg, group.ctx, compiled)
        first, second = eng.train_step(_batch(cfg, 1)), eng.train_step(_batch(cfg, 2))
    assert first["compile_s"] > 0
    assert "compile_s" not in second


def test_bf16_step_at_dp1_does_not_all_reduce_and_equals_the_reducing_step(monkeypatch):
    """bf16 at DP=1 runs DeepSpeed's BF16_Optimizer; its bucketed all-reduce of the fp32
    gradients over a group of one (flatten, reduce, copy back at every boundary) is skipped,
    and two steps of two accumulated micro-batches give bit for bit the weights of an engine
    that still runs it."""
    cfg = _config("train.precision=bf16", "train.global_batch_size=4")
    with _LocalGroup() as group:
        engines = [_engine(cfg, group.ctx) for _ in range(2)]
        quiet, reducing = engines
        assert type(quiet.ds.optimizer).__name__ == "BF16_Optimizer"
        assert not quiet.ds.enable_backward_allreduce
        reducing.ds.enable_backward_allreduce = True  # what DeepSpeed does by default
        reduced = []
        real = reducing.ds.allreduce_gradients

        def counting(*a, **k):
            reduced.append(1)
            return real(*a, **k)

        monkeypatch.setattr(reducing.ds, "allreduce_gradients", counting)

        def no_reduce(*a, **k):
            raise AssertionError("bf16 gradients all-reduced over a data-parallel group of one")

        monkeypatch.setattr(quiet.ds, "allreduce_gradients", no_reduce)
        for seed in (0, 1):
            batch = _batch(cfg, 2 * seed) + _batch(cfg, 2 * seed + 1)
            for eng in engines:
                eng.set_lr(1e-3)
            a, b = quiet.train_step(batch), reducing.train_step(batch)
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
        assert reduced  # the reference did reduce
        for p, q in zip(quiet.module.parameters(), reducing.module.parameters()):
            assert torch.equal(p, q)


def test_cpu_matmul_puts_the_steps_gemms_on_onednn_and_trains_alike():
    """train.cpu_matmul: onednn (what auto takes on an AMD CPU) marks the model's blocks for
    oneDNN, blas leaves them on torch's BLAS; two steps of each give the same losses, grad
    norms and weights within float tolerance."""
    from megagpt.model.matmul import onednn_unavailable

    if onednn_unavailable() is not None:
        pytest.skip(onednn_unavailable())
    engines = []
    with _LocalGroup() as group:
        for setting in ("onednn", "blas"):
            cfg = _config(f"train.cpu_matmul={setting}")
            eng = _engine(cfg, group.ctx)
            flags = [m.onednn for m in eng.module.modules() if hasattr(m, "onednn")]
            assert len(flags) == 2 * 2 + 1 and set(flags) == {setting == "onednn"}, flags
            engines.append(eng)
        for seed in (0, 1):
            out = []
            for eng in engines:
                eng.set_lr(1e-3)
                out.append(eng.train_step(_batch(cfg, seed)))
            assert out[0]["loss"] == pytest.approx(out[1]["loss"], rel=1e-6)
            assert out[0]["grad_norm"] == pytest.approx(out[1]["grad_norm"], rel=1e-5)
    # AdamW moves a weight by ~lr whatever the size of its gradient, so rounding differences in
    # a near-zero gradient show at ~1e-6; 1e-5 is 1 % of two steps' update.
    for p, q in zip(*(e.module.parameters() for e in engines)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_a_bf16_engine_starts_without_deepspeeds_memory_reports(capsys, caplog):
    """DeepSpeed's BF16_Optimizer prints six forced memory reports (18 lines) while it is
    built; the engine moves them to the debug log, and nothing else printed is lost."""
    import logging

    cfg = _config("train.precision=bf16", "train.global_batch_size=4")
    with caplog.at_level(logging.DEBUG, logger="megagpt.engine.accelerator"):
        with _LocalGroup() as group:
            eng = _engine(cfg, group.ctx)
    assert type(eng.ds.optimizer).__name__ == "BF16_Optimizer"
    out = capsys.readouterr().out
    assert "bf16_optimizer" not in out and "Max_MA" not in out and "CPU Virtual" not in out, out
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "begin bf16_optimizer" in logged and "Max_MA" in logged


def test_memory_report_filter_keeps_every_other_line():
    from megagpt.engine.accelerator import drop_memory_reports

    text = (
        "a line of DeepSpeed's own\n"
        "begin bf16_optimizer\n"
        "MA 0.62 GB         Max_MA 1.28 GB         CA 1.28 GB         Max_CA 1 GB \n"
        "CPU Virtual Memory:  used = 1.61 GB, percent = 1.3%\n"
        "MA is also a word\n"
    )
    kept, dropped = drop_memory_reports(text)
    assert kept == "a line of DeepSpeed's own\nMA is also a word\n"
    assert dropped[0] == "begin bf16_optimizer" and len(dropped) == 3
