"""Worker functions the distributed tests run on every rank (see launcher.py)."""

from __future__ import annotations

import torch


def engine_losses_on(
    overrides: list[str], steps: int = 5, seed: int = 1234, device: str = "cpu"
) -> dict:
    """engine_losses on ``device`` ("cuda" uses NCCL and this rank's LOCAL_RANK GPU)."""
    return engine_losses(overrides, steps, seed, device)


def engine_losses(
    overrides: list[str],
    steps: int = 5,
    seed: int = 1234,
    device: str = "cpu",
    accumulate_in_bf16: bool = False,
    repeat_micro_batch: bool = False,
) -> dict:
    """Train a tiny GPT for ``steps`` global batches of fixed synthetic tokens; return losses.

    The global batch is the same token tensor for every layout; each data-parallel rank takes
    its contiguous share, as the real sampler does. ``accumulate_in_bf16`` gives DeepSpeed the
    config without megagpt's fp32 accumulation (its own default), to show what that costs;
    ``repeat_micro_batch`` makes every micro-batch of a step the same tokens, so the micro-batch
    gradients agree in sign as the mean gradient of real text makes them (random tokens give
    gradients that mostly cancel, which hides accumulation error).
    """
    if accumulate_in_bf16:
        from megagpt.engine import engine as engine_module

        generated = engine_module.deepspeed_config

        def bf16_accumulation(cfg, world):
            ds = generated(cfg, world)
            del ds["data_types"], ds["communication_data_type"]
            return ds

        engine_module.deepspeed_config = bf16_accumulation
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
            *overrides,
        ],
    )
    world = parallel.world_size_from_env()
    dev = parallel.resolve_device(device)
    validate(cfg, world, cuda=dev.type == "cuda", need_data=False)
    ctx = parallel.initialize(cfg.parallel, dev)
    dims = ctx.dims
    torch.manual_seed(seed)
    module = build_model(cfg, dims, dev)
    initialize_weights(module, cfg.model, seed, ctx.tp_rank, dims.tp)
    engine = Engine(cfg, module, ctx)
    gb, micro, seq = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.model.seq_length
    gen = torch.Generator().manual_seed(seed)
    losses, norms = [], []
    for _ in range(steps):
        data = torch.randint(0, cfg.model.vocab_size, (gb, seq + 1), generator=gen)
        if repeat_micro_batch:
            data = data[:micro].repeat(gb // micro, 1)
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
        out = engine.train_step(mbs)
        losses.append(out["loss"])
        norms.append(out["grad_norm"])
    reduces = engine.reduces_over_data_parallel
    parallel.destroy()
    return {"losses": losses, "grad_norms": norms, "reduces_over_dp": reduces}


def train_run(config: str, overrides: list[str]) -> dict:
    """``megagpt train`` in this process; returns the final step and samples, and the step it
    resumed from (0: a fresh start), so that a resume test can tell a resume from a run that
    ignored its checkpoint and trained the same seeded steps again."""
    from megagpt import parallel
    from megagpt.config import load_config
    from megagpt.training.trainer import Trainer

    trainer = Trainer(load_config(config, overrides))
    resumed = trainer.state.step
    state = trainer.run()
    parallel.destroy()
    return {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "resumed": resumed,
    }


def logits_of_model_dir(directory: str, tokens: list[list[int]], tp: int = 1) -> list:
    """Load a model directory at TP=``tp`` and return the full logits for ``tokens``."""
    from megagpt import parallel
    from megagpt.checkpoint import load_into, load_tensors, read_config
    from megagpt.config import ParallelConfig
    from megagpt.model import GPTModel, megatron_config

    cfg = read_config(directory)
    pcfg = ParallelConfig(tensor=tp)
    ctx = parallel.initialize(pcfg, torch.device("cpu"))
    model = GPTModel(cfg, megatron_config(cfg, pcfg))
    load_into(model, load_tensors(directory), cfg, ctx.tp_rank, tp)
    model.eval()
    with torch.no_grad():
        local = model(torch.tensor(tokens))  # [s, b, V/tp]
        parts = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(parts, local, group=ctx.tp_group)
        full = torch.cat(parts, dim=-1)[..., : cfg.vocab_size]
    parallel.destroy()
    return full.tolist()


def module_parameter_count(size: str, tp: int = 1) -> dict:
    """Parameters of the built GPT (summed over TP ranks by the caller) and the padded vocab."""
    from megagpt import parallel
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, megatron_config, padded_vocab_size

    cfg = from_name(size)
    pcfg = ParallelConfig(tensor=tp)
    parallel.initialize(pcfg, torch.device("cpu"))
    with torch.device("meta"):
        model = GPTModel(cfg, megatron_config(cfg, pcfg))
    local = sum(p.numel() for p in model.parameters())
    replicated = sum(
        p.numel() for p in model.parameters() if not getattr(p, "tensor_model_parallel", False)
    )
    parallel.destroy()
    return {
        "local": local,
        "replicated": replicated,
        "padded_vocab": padded_vocab_size(cfg.vocab_size, tp),
    }


def dropout_draws(config: str, overrides: list[str]) -> dict:
    """``megagpt train`` that records, at every dropout call, a draw from the generator that
    dropout is about to use: attention dropout (inside scaled_dot_product_attention; on our CPU
    kernel, ``train.cpu_kernels``, the seed its mask is drawn from) and the others (embedding
    and residual dropouts, through F.dropout). Returns this rank's draws."""
    import torch.nn.functional as F

    from megagpt.model import cpu_training

    record: dict[str, list] = {"attention": [], "residual": []}
    sdpa, dropout = F.scaled_dot_product_attention, F.dropout
    kernel = cpu_training.causal_attention

    def sdpa_recorded(*args, **kwargs):
        if kwargs.get("dropout_p", 0.0) > 0:
            record["attention"].append(torch.rand(2).tolist())
        return sdpa(*args, **kwargs)

    def kernel_recorded(qkv, dropout=0.0, seed=0, head0=0):
        if dropout > 0:
            record["attention"].append(seed)
        return kernel(qkv, dropout, seed, head0)

    cpu_training.causal_attention = kernel_recorded

    def dropout_recorded(x, p=0.5, training=True, inplace=False):
        if training and p > 0:
            record["residual"].append(torch.rand(2).tolist())
        return dropout(x, p, training, inplace)

    F.scaled_dot_product_attention, F.dropout = sdpa_recorded, dropout_recorded
    train_run(config, overrides)
    return record
