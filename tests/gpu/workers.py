"""Worker functions the GPU tests run in their own process (see tests/distributed/launcher.py)."""

from __future__ import annotations

import torch


def memorize_losses(precision: str, device: str, steps: int = 20, seed: int = 1234) -> dict:
    """Train gpt3-tiny on ONE fixed global batch for ``steps`` steps; return losses and norms.

    Random tokens drawn afresh each step keep the loss at ln(vocab) whatever the arithmetic
    does; one batch seen again and again is learnt, so the loss falls step after step and a
    precision that drifts from fp32 shows up along the whole curve. Four micro-batches per step
    exercise gradient accumulation.
    """
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
            f"train.precision={precision}",
            "optim.schedule=constant",
            "optim.lr=1e-3",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
        ],
    )
    dev = parallel.resolve_device(device)
    validate(cfg, 1, cuda=dev.type == "cuda", need_data=False)
    ctx = parallel.initialize(cfg.parallel, dev)
    torch.manual_seed(seed)
    module = build_model(cfg, ctx.dims, dev)
    initialize_weights(module, cfg.model, seed, 0, 1)
    engine = Engine(cfg, module, ctx)
    gb, micro, seq = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.model.seq_length
    data = torch.randint(
        0, cfg.model.vocab_size, (gb, seq + 1), generator=torch.Generator().manual_seed(seed)
    )
    mbs = [
        {
            "tokens": data[i : i + micro, :-1],
            "labels": data[i : i + micro, 1:],
            "loss_mask": torch.ones(micro, seq),
        }
        for i in range(0, gb, micro)
    ]
    losses, norms = [], []
    for _ in range(steps):
        out = engine.train_step(mbs)
        losses.append(out["loss"])
        norms.append(out["grad_norm"])
    parallel.destroy()
    return {"losses": losses, "grad_norms": norms}


def attention_kernels(device: str = "cuda", seq: int = 256, batch: int = 2) -> dict:
    """A bf16 forward + backward of megagpt's SelfAttention: the profiler's op names, and
    whether it also runs with PyTorch's SDPA restricted to the flash kernel alone. (On the CPU
    it checks this helper itself, in tests/distributed/test_gpu_helpers.py.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from megagpt import parallel
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import megatron_config
    from megagpt.model.layers import SelfAttention

    dev = parallel.resolve_device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pcfg = ParallelConfig()
    parallel.initialize(pcfg, dev)
    mcfg = from_name("gpt3-base")  # head dim 64: a shape every flash build supports
    attn = SelfAttention(mcfg, megatron_config(mcfg, pcfg, torch.bfloat16), recompute_core=False)
    attn = attn.to(dev, torch.bfloat16)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(
        seq, batch, mcfg.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True
    )  # [s, b, h]

    def step():
        out, _bias = attn(x)  # [s, b, h]
        out.float().sum().backward()

    step()  # warm-up: kernel selection and lazy initialisation outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    names = sorted({e.key for e in prof.key_averages()})
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            step()
        sync()
        flash_only = "ok"
    except RuntimeError as e:
        flash_only = f"{type(e).__name__}: {e}"[:2000]
    parallel.destroy()
    return {
        "ops": names,
        "flash_only": flash_only,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
    }
