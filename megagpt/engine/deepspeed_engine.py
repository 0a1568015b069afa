"""DeepSpeed behind one module: the generated JSON config, the model wrapping, the step.

This is the only module that imports deepspeed. Pipeline parallelism (PP > 1) uses DeepSpeed's
PipelineModule/PipelineEngine (1F1B) with the tied embedding shared by the first and last
stage; PP = 1 uses the plain DeepSpeedEngine, which allows ZeRO stages 0-3.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at import time; without CUDA it must be told "cpu".
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # noqa: E402

from megagpt.config.schema import Config  # noqa: E402
from megagpt.config.validate import grad_accumulation_steps  # noqa: E402
from megagpt.model.gpt import GPTModel, padded_vocab_size  # noqa: E402
from megagpt.model.layers import (  # noqa: E402
    DecoderLayer,
    FinalNorm,
    PositionEmbedding,
    WordEmbedding,
    lm_loss,
)
from megagpt.model.mcore import DTYPES, megatron_config  # noqa: E402
from megagpt.parallel import MegatronMPU, ParallelDims  # noqa: E402


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for ``cfg`` on ``world_size`` ranks (never hand-written)."""
    t = cfg.train
    gas = grad_accumulation_steps(cfg, world_size)
    dp = world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)
    ds: dict = {
        "train_batch_size": t.micro_batch_size * gas * dp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # Our optimizer is torch's AdamW (fused on CUDA); DeepSpeed must accept it under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {
            "enabled": True, "loss_scale": 0,
            "initial_scale_power": int(round(math.log2(t.initial_loss_scale))),
            "loss_scale_window": t.loss_scale_window, "hysteresis": 2, "min_loss_scale": 1,
        }
    if cfg.parallel.pipeline > 1:
        ds["pipeline"] = {"pipe_partitioned": True, "grad_partitioned": True}
    return ds


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms (1-d) or positions."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _pipeline_module(cfg: Config, mp, dims: ParallelDims) -> PipelineModule:
    m, p = cfg.model, cfg.parallel
    padded = padded_vocab_size(m.vocab_size, p.tensor)
    specs = [TiedLayerSpec("embed", WordEmbedding, m, mp, padded,
                           tied_weight_attr="word_embeddings.weight"),
             LayerSpec(PositionEmbedding, m, mp)]
    specs += [LayerSpec(DecoderLayer, m, mp, i, p.recompute) for i in range(m.num_layers)]
    specs += [LayerSpec(FinalNorm, m, mp),
              TiedLayerSpec("embed", WordEmbedding, m, mp, padded,
                            forward_fn=lambda module, h: module.logits(h),
                            tied_weight_attr="word_embeddings.weight")]
    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    method = "type:DecoderLayer" if p.pipeline_partition == "uniform" else "parameters"
    return PipelineModule(layers=specs, topology=topo, partition_method=method,
                          loss_fn=lambda logits, target: lm_loss(logits, target[0], target[1]))


def build_model(cfg: Config, dims: ParallelDims) -> torch.nn.Module:
    """The local part of the GPT: the whole model (PP=1) or this rank's pipeline stage."""
    mp = megatron_config(cfg.model, cfg.parallel, torch.float32)
    # deepspeed.comm wraps the torch.distributed group that megagpt.parallel already started.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    if dims.pp > 1:
        return _pipeline_module(cfg, mp, dims)
    return GPTModel(cfg.model, mp, cfg.parallel.recompute)


class Engine:
    """One training engine for every layout: ``train_step`` runs one global batch."""

    def __init__(self, cfg: Config, module: torch.nn.Module, dims: ParallelDims,
                 device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        self.pipeline = dims.pp > 1
        module.to(device)
        o = cfg.optim
        groups = _param_groups(module, o.weight_decay)
        fused = device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      fused=fused)
        ds_cfg = deepspeed_config(cfg, dims.world)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_cfg,
            mpu=None if self.pipeline else MegatronMPU(),
            dist_init_required=False)
        self._sp_hooks(module)
        self._record_fp32_grad_norm()

    # -- the step -------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def set_global_batch(self, global_batch: int) -> None:
        """Batch-size ramp: change the accumulation steps (global = micro x acc x DP)."""
        if global_batch != self.ds.train_batch_size():
            self.ds.set_train_batch_size(global_batch)

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over ``micro_batches`` (this rank's share of a global batch).

        Returns the loss averaged over micro-batches and data-parallel ranks (identical on every
        rank), the global grad norm, the loss scale and whether the step was skipped (fp16
        overflow).
        """
        skipped_before = self.ds.skipped_steps
        self.ds.train()
        if self.pipeline:
            loss = self.ds.train_batch(iter(self._pipe_batches(micro_batches)))
            loss = loss.detach().float().to(self.device)
        else:
            total = torch.zeros((), device=self.device)
            for mb in micro_batches:
                tokens, labels, mask = self._to_device(mb)
                out = self.ds(tokens, labels, mask)
                self.ds.backward(out)
                self.ds.step()
                total += out.detach().float()
            loss = total / len(micro_batches)
            if self.dims.dp > 1:
                dist.all_reduce(loss, group=MegatronMPU().get_data_parallel_group())
                loss /= self.dims.dp
        norm = self.ds.get_global_grad_norm()
        return {
            "loss": float(loss),
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "loss_scale": float(getattr(self.ds.optimizer, "cur_scale", 1.0) or 1.0),
            "skipped": self.ds.skipped_steps > skipped_before,
        }

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[dict]) -> float:
        """Mean loss over ``micro_batches`` and data-parallel ranks, without a step."""
        self.ds.eval()
        if self.pipeline:
            loss = self.ds.eval_batch(iter(self._pipe_batches(micro_batches)),
                                      num_micro_batches=len(micro_batches))
            return float(loss)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            tokens, labels, mask = self._to_device(mb)
            total += self.ds(tokens, labels, mask).float()
        loss = total / len(micro_batches)
        if self.dims.dp > 1:
            dist.all_reduce(loss, group=MegatronMPU().get_data_parallel_group())
            loss /= self.dims.dp
        return float(loss)

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, directory: str, tag: str, client_state: dict) -> None:
        """Every rank writes its part of the model and optimizer under ``directory/tag``."""
        self.ds.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict:
        """Load ``directory/tag``; returns the client state saved with it."""
        path, client = self.ds.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}/{tag}")
        return client or {}

    def fp32_value(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full fp32 master value of a (local, TP-sharded) parameter, whatever the ZeRO
        stage and precision. Collective over data parallel under ZeRO: call it on every rank
        for the same parameters in the same order."""
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(p) if self.cfg.parallel.zero_stage > 0 or \
            self.cfg.train.precision != "fp32" else None
        return value if value is not None else p

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    # -- helpers --------------------------------------------------------------------------
    def _to_device(self, mb: dict):
        tokens = mb["tokens"].to(self.device, non_blocking=True)
        labels = mb["labels"].to(self.device, non_blocking=True)
        mask = mb["loss_mask"].to(self.device, non_blocking=True)
        return tokens, labels, mask

    def _pipe_batches(self, micro_batches: list[dict]):
        return [(mb["tokens"], (mb["labels"], mb["loss_mask"].float())) for mb in micro_batches]

    def _record_fp32_grad_norm(self) -> None:
        """DeepSpeed's plain fp32 path (ZeRO 0, no bf16/fp16 wrapper) clips gradients but drops
        the norm it computed; keep it so every layout reports its grad norm."""
        from deepspeed.runtime.utils import clip_grad_norm_

        ds = self.ds

        def clip_and_record():
            ds._global_grad_norm = clip_grad_norm_(
                parameters=ds.module.parameters(), max_norm=ds.gradient_clipping(), mpu=ds.mpu)

        ds.clip_fp32_gradients = clip_and_record

    def _sp_hooks(self, module: torch.nn.Module) -> None:
        """Sequence parallel: replicated parameters see s/tp tokens per rank, so their grads
        are summed over the TP group (megatron-core leaves this to its DDP, which we do not
        use)."""
        if not self.cfg.parallel.sequence_parallel:
            return
        group = MegatronMPU().get_tensor_model_parallel_group()

        def reduce(grad: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(grad, group=group)
            return grad

        for p in module.parameters():
            if getattr(p, "sequence_parallel", False):
                p.register_hook(reduce)
