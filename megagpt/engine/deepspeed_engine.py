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

import deepspeed
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megagpt.config.schema import Config
from megagpt.config.validate import grad_accumulation_steps
from megagpt.model.gpt import GPTModel, padded_vocab_size
from megagpt.model.layers import (
    DecoderLayer,
    FinalNorm,
    PositionEmbedding,
    WordEmbedding,
    lm_loss,
)
from megagpt.model.mcore import megatron_config
from megagpt.parallel import MegatronMPU, ParallelDims


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
            "initial_scale_power": round(math.log2(t.initial_loss_scale)),
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
        """Every rank writes its part of the model and optimizer under ``directory/tag``.

        Always the layout-free record of ``megagpt.checkpoint.reshard`` (fp32 master and Adam
        moments by canonical name and TP shard, for an exact resume under any TP/PP/DP/ZeRO);
        DeepSpeed's native files too only with ``checkpoint.native`` (they double the size).
        Collective; the caller commits ``latest`` afterwards, so a crash leaves no half state.
        """
        from megagpt import parallel
        from megagpt.checkpoint import reshard

        if self.cfg.checkpoint.native:
            self.ds.save_checkpoint(directory, tag=tag, client_state=client_state,
                                    save_latest=False)
        path = os.path.join(directory, tag)
        os.makedirs(path, exist_ok=True)
        self._materialize_optimizer_state()
        reshard.save_shards(
            path, [(n, p, d) for n, p, _, d in self._local_params(skip_tied_copy=True)],
            self._state_get, tp_rank=parallel.tp_rank(), tp=self.dims.tp,
            pp_rank=parallel.pp_rank(), pp=self.dims.pp, write=parallel.dp_rank() == 0)
        if dist.get_rank() == 0:
            reshard.save_meta(path, layout=self._layout(), model=self.cfg.model,
                              adam_step=self._adam_step(), engine=self._counters(),
                              client=client_state)
        dist.barrier()

    def load(self, directory: str, tag: str) -> dict:
        """Load ``directory/tag``; returns the client state saved with it.

        Same layout and DeepSpeed files present: DeepSpeed's own load (bit-exact, with RNG).
        Otherwise the layout-free record: weights, fp32 master, Adam moments and step are
        re-cut for this layout; the client state then has no ``rng`` (the trainer reseeds).
        """
        from megagpt import parallel
        from megagpt.checkpoint import reshard

        path = os.path.join(directory, tag)
        meta = reshard.read_meta(path)
        native = any(f.endswith("model_states.pt") for f in os.listdir(path)) \
            if os.path.isdir(path) else False
        if meta is None or (native and meta["layout"] == self._layout()):
            path, client = self.ds.load_checkpoint(directory, tag=tag,
                                                   load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}/{tag}")
            return client or {}
        record = reshard.Record(path)
        self._materialize_optimizer_state()
        reshard.load_shards(record, list(self._local_params()), self._state_set,
                            vocab_size=self.cfg.model.vocab_size, tp_rank=parallel.tp_rank(),
                            tp=self.dims.tp)
        self._refresh_low_precision()
        self._set_adam_step(int(meta["adam_step"]))
        self._set_counters(meta.get("engine", {}))
        dist.barrier()
        return dict(meta.get("client", {}))

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Initialise from full canonical weights (a model directory, ModelScope or Hugging Face
        import) at any layout; the optimizer starts fresh (zero moments, step 0)."""
        from megagpt import parallel
        from megagpt.checkpoint import reshard

        self._materialize_optimizer_state()
        for name, p, shape, dim in self._local_params():
            if name not in tensors:
                raise reshard.CheckpointError(f"{source}: missing tensor {name!r} (the model "
                                              f"expects shape {shape})")
            self._state_set(p, "param", reshard.local_shard(
                name, tensors[name], shape, dim, self.cfg.model.vocab_size, parallel.tp_rank(),
                self.dims.tp, source))
        self._refresh_low_precision()
        dist.barrier()

    def fp32_value(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full fp32 master value of a (local, TP-sharded) parameter, whatever the ZeRO
        stage and precision. Collective over data parallel under ZeRO: call it on every rank
        for the same parameters in the same order."""
        from deepspeed.utils import safe_get_full_fp32_param

        master = self._unfused_masters().get(id(p))
        if master is not None:
            return master
        value = safe_get_full_fp32_param(p) if self.cfg.parallel.zero_stage > 0 or \
            self.cfg.train.precision != "fp32" else None
        return value if value is not None else p

    # -- checkpoint helpers: the fp32 master and Adam state, whatever the ZeRO stage ------
    def _layout(self) -> dict:
        return {"tp": self.dims.tp, "pp": self.dims.pp, "dp": self.dims.dp,
                "zero_stage": self.cfg.parallel.zero_stage, "precision": self.cfg.train.precision}

    def _local_params(self, skip_tied_copy: bool = False):
        """(canonical name, parameter, full TP-unsharded shape, partition dim) of this rank.

        ``skip_tied_copy``: the last pipeline stage's copy of the tied word embedding is the
        same tensor as stage 0's, so the record stores it once."""
        from megagpt.checkpoint.canonical import WORD
        from megagpt.model.init import canonical_parameters, full_shape

        last = self.pipeline and self.ds.is_last_stage() and not self.ds.is_first_stage()
        for name, p in canonical_parameters(self.ds.module):
            if skip_tied_copy and last and name == WORD:
                continue
            shape, dim = full_shape(p, self.dims.tp)
            if hasattr(p, "ds_shape"):  # ZeRO-3: p itself is an empty placeholder
                shape = list(p.ds_shape)
                if dim is not None:
                    shape[dim] *= self.dims.tp
            yield name, p, shape, dim

    def _base_optimizer(self) -> torch.optim.Optimizer:
        opt = self.ds.optimizer
        while not isinstance(opt, torch.optim.Optimizer):
            opt = opt.optimizer
        return opt

    def _unfused_masters(self) -> dict[int, torch.Tensor]:
        """bf16/fp16 at ZeRO 0 without a pipeline: DeepSpeed's FP16_UnfusedOptimizer keeps one
        fp32 master tensor per model parameter (``fp32_groups`` parallel to ``fp16_groups``);
        maps id(model parameter) -> its master. Empty for every other optimizer."""
        opt = self.ds.optimizer
        if type(opt).__name__ != "FP16_UnfusedOptimizer":
            return {}
        return {id(lp): hp for lows, highs in zip(opt.fp16_groups, opt.fp32_groups)
                for lp, hp in zip(lows, highs)}

    def _plain_optimizer(self) -> bool:
        """ZeRO 0 in fp32: DeepSpeed steps torch's AdamW on the model parameters directly."""
        return isinstance(self.ds.optimizer, torch.optim.Optimizer)

    def _flat_states(self) -> list[torch.Tensor]:
        """The tensors the base optimizer keeps state for (ZeRO's flat fp32 partitions)."""
        opt = self.ds.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                     "fp32_groups_flat_partition"):
            flats = getattr(opt, attr, None)
            if flats:
                return list(flats)
        if self._plain_optimizer():
            return [p for g in opt.param_groups for p in g["params"]]
        if self._unfused_masters():
            return [hp for highs in opt.fp32_groups for hp in highs]
        # Every optimizer DeepSpeed picks for our configs is handled above (fp32/bf16/fp16 at
        # ZeRO 0-3, with and without a pipeline); a new DeepSpeed wrapper lands here.
        raise RuntimeError(
            f"megagpt checkpoints do not know DeepSpeed's {type(opt).__name__} "
            f"(precision {self.cfg.train.precision}, ZeRO {self.cfg.parallel.zero_stage}); "
            "please report this with your DeepSpeed version")

    def _materialize_optimizer_state(self) -> None:
        """AdamW creates its state at the first step; a checkpoint saved or loaded before it
        needs zero moments to exist (and ZeRO's per-parameter views linked to them)."""
        base = self._base_optimizer()
        flags = base.param_groups[0] if base.param_groups else {}
        on_device = flags.get("fused") or flags.get("capturable")
        for t in self._flat_states():
            if not base.state.get(t):
                base.state[t] = {
                    "step": torch.zeros((), dtype=torch.float32,
                                        device=t.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format)}
        if hasattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.ds.optimizer._hp_optimizer_states_linked = False
            self.ds.optimizer._lazy_init_hp_params_optimizer_state()

    def _state_get(self, p: torch.nn.Parameter, kind: str) -> torch.Tensor:
        """The local TP shard of ``kind`` (param = fp32 master) for ``p``; collective over DP
        under ZeRO."""
        from deepspeed.utils import safe_get_full_optimizer_state

        if kind == "param":
            return self.fp32_value(p)
        if self._plain_optimizer():
            return self.ds.optimizer.state[p][kind]
        master = self._unfused_masters().get(id(p))
        if master is not None:
            return self._base_optimizer().state[master][kind]
        value = safe_get_full_optimizer_state(p, kind)
        if value is None:
            raise RuntimeError(f"no fp32 {kind} for a parameter under "
                                      f"{type(self.ds.optimizer).__name__}")
        return value

    def _state_set(self, p: torch.nn.Parameter, kind: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(device=self.device, dtype=torch.float32)
        master = self._unfused_masters().get(id(p))
        if self._plain_optimizer():
            target = p.data if kind == "param" else self.ds.optimizer.state[p][kind]
            target.copy_(value)
        elif master is not None:
            if kind == "param":
                master.data.copy_(value)
                p.data.copy_(value.to(p.dtype))
            else:
                self._base_optimizer().state[master][kind].copy_(value)
        elif kind == "param":
            safe_set_full_fp32_param(p, value)
            if not hasattr(p, "ds_id"):  # ZeRO 0-2 keep the whole low-precision copy here
                p.data.copy_(value.to(p.dtype))
        else:
            safe_set_full_optimizer_state(p, value, kind)

    def _refresh_low_precision(self) -> None:
        """ZeRO-3: copy the fp32 partitions into the (possibly low-precision) partitions the
        forward gathers from."""
        opt = self.ds.optimizer
        lp = getattr(opt, "fp16_partitioned_groups_flat", None)
        if lp:
            for low, high in zip(lp, opt.fp32_partitioned_groups_flat):
                low.data.copy_(high.data)

    def _adam_step(self) -> int:
        states = [self._base_optimizer().state.get(t) for t in self._flat_states()]
        return int(max((float(s["step"]) for s in states if s and "step" in s), default=0))

    def _set_adam_step(self, step: int) -> None:
        base = self._base_optimizer()
        for t in self._flat_states():
            base.state[t]["step"].fill_(float(step))

    def _counters(self) -> dict:
        scale = getattr(self.ds.optimizer, "cur_scale", None)
        return {"global_steps": self.ds.global_steps, "global_samples": self.ds.global_samples,
                "skipped_steps": self.ds.skipped_steps,
                "loss_scale": float(scale) if scale is not None else None}

    def _set_counters(self, c: dict) -> None:
        for key in ("global_steps", "global_samples", "skipped_steps"):
            if key in c:
                setattr(self.ds, key, int(c[key]))
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        if c.get("loss_scale") and scaler is not None and hasattr(scaler, "cur_scale"):
            scaler.cur_scale = float(c["loss_scale"])

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
