"""The training engine: the model wrapped by DeepSpeed, one optimizer step, evaluation, and the
hand-over of tensors to the checkpoint format.

Pipeline parallelism (PP > 1) uses DeepSpeed's PipelineModule/PipelineEngine (1F1B) with the tied
embedding shared by the first and last stage; PP = 1 uses the plain DeepSpeedEngine, which allows
ZeRO stages 0-3. deepspeed is imported through ``accelerator.import_deepspeed(device)`` only.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megagpt.config.schema import Config
from megagpt.engine.accelerator import import_deepspeed
from megagpt.engine.ds_config import deepspeed_config, deepspeed_zero_stage
from megagpt.engine.optim_state import adapter_for
from megagpt.model.gpt import GPTModel, gpt_blocks
from megagpt.model.layers import lm_loss
from megagpt.model.mcore import megatron_config
from megagpt.model.rng import TensorParallelRNG
from megagpt.parallel import MegatronMPU, ParallelDims


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms (1-d) or positions."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _pipeline_module(cfg: Config, mp, dims: ParallelDims, device: torch.device):
    """This rank's pipeline stage, built by DeepSpeed from ``gpt_blocks``."""
    import_deepspeed(device)
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    rng = TensorParallelRNG()
    specs = []
    for block in gpt_blocks(cfg.model, mp, cfg.parallel.recompute, rng):
        if block.tie is None:
            specs.append(LayerSpec(block.cls, *block.args))
            continue
        forward = None if block.method == "forward" else \
            (lambda module, h, name=block.method: getattr(module, name)(h))
        specs.append(TiedLayerSpec(block.tie, block.cls, *block.args, forward_fn=forward,
                                   tied_weight_attr="word_embeddings.weight"))
    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    method = "type:DecoderLayer" if cfg.parallel.pipeline_partition == "uniform" else "parameters"
    module = PipelineModule(layers=specs, topology=topo, partition_method=method,
                            loss_fn=lambda logits, target: lm_loss(logits, target[0], target[1]))
    module.dropout_rng = rng  # the same attribute GPTModel has
    return module


def build_model(cfg: Config, dims: ParallelDims, device: torch.device) -> torch.nn.Module:
    """The local part of the GPT: the whole model (PP=1) or this rank's pipeline stage.

    ``device`` is the run's resolved device; it chooses DeepSpeed's accelerator (the model itself
    is built on the CPU and moved by the engine)."""
    mp = megatron_config(cfg.model, cfg.parallel, torch.float32)
    deepspeed = import_deepspeed(device)
    # deepspeed.comm wraps the torch.distributed group that megagpt.parallel already started.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    if dims.pp > 1:
        return _pipeline_module(cfg, mp, dims, device)
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
        deepspeed = import_deepspeed(device)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_cfg,
            mpu=None if self.pipeline else MegatronMPU(),
            dist_init_required=False)
        # Chosen once: where this DeepSpeed optimizer wrapper keeps fp32 masters and moments.
        self.optim_state = adapter_for(self.ds.optimizer, device)
        self._sp_hooks(module)
        self._record_fp32_grad_norm()
        self._skip_nonfinite_plain_step()

    @property
    def dropout_rng(self) -> TensorParallelRNG:
        """The tensor-parallel region's dropout stream of the local model part."""
        return self.ds.module.dropout_rng

    def describe_precision(self) -> str:
        """One line on how gradients are accumulated and which optimizer wrapper runs."""
        t, stage = self.cfg.train, deepspeed_zero_stage(self.cfg, self.dims.world)
        accum = "fp32" if t.precision in ("fp32", "bf16") else t.precision
        note = f" for parallel.zero_stage={self.cfg.parallel.zero_stage} (see " \
            "megagpt/engine/ds_config.py)" if stage != self.cfg.parallel.zero_stage else ""
        return (f"{t.precision} parameters, {accum} gradient accumulation; DeepSpeed ZeRO "
                f"{stage}{note} with {type(self.ds.optimizer).__name__}")

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
        rank), the global grad norm, the loss scale and whether the step was skipped: a
        non-finite gradient norm (fp16 overflow, or a NaN/Inf gradient at any precision) skips
        the optimizer step on every layout, weights and Adam moments untouched.
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
        DeepSpeed's native files too only with ``checkpoint.native`` (they double the size, and
        a resume reads them only with ``checkpoint.trust_pickle``). Collective; the caller
        commits (manifest, then ``latest``) afterwards, so a crash leaves no half state.
        """
        from megagpt import parallel
        from megagpt.checkpoint import reshard

        if self.cfg.checkpoint.native:
            self.ds.save_checkpoint(directory, tag=tag, client_state=client_state,
                                    save_latest=False)
        path = os.path.join(directory, tag)
        os.makedirs(path, exist_ok=True)
        self.optim_state.materialize()
        reshard.save_shards(
            path, [(n, p, d) for n, p, _, d in self._local_params(skip_tied_copy=True)],
            self.optim_state.get, tp_rank=parallel.tp_rank(), tp=self.dims.tp,
            pp_rank=parallel.pp_rank(), pp=self.dims.pp, write=parallel.dp_rank() == 0)
        if dist.get_rank() == 0:
            reshard.save_meta(path, layout=self._layout(), model=self.cfg.model,
                              adam_step=self.optim_state.adam_step(), engine=self._counters(),
                              client=client_state)
        dist.barrier()

    def load(self, directory: str, tag: str) -> dict:
        """Load ``directory/tag``; returns the client state saved with it.

        The layout-free record (safetensors + JSON): weights, fp32 master, Adam moments and
        step, re-cut for this layout. DeepSpeed's native files are pickles (``torch.load`` with
        ``weights_only=False`` runs any code they hold), so DeepSpeed's own load is used only
        with ``checkpoint.trust_pickle`` and when the record is absent or has this very layout;
        without it they are never opened, and a folder with nothing else is refused with a
        CheckpointError naming the file.
        """
        from megagpt import parallel
        from megagpt.checkpoint import reshard

        path = os.path.join(directory, tag)
        meta = reshard.read_meta(path)
        # DeepSpeed writes its files (mp_rank_XX_model_states.pt, *_optim_states.pt, ...) at the
        # top of the tag folder; megagpt's own .pt files (rng/) are one level down.
        native = sorted(f for f in os.listdir(path) if f.endswith(".pt")) \
            if os.path.isdir(path) else []
        trust = self.cfg.checkpoint.trust_pickle
        if meta is None and not (native and trust):
            if native:
                raise reshard.CheckpointError(
                    f"{os.path.join(path, native[0])}: a DeepSpeed native checkpoint (a pickle) "
                    f"and no layout-free record ({reshard.RECORD}/meta.json). Reading it can run "
                    "code stored in the file; megagpt reads weights only with safetensors or "
                    "torch.load(weights_only=True). If you wrote this checkpoint yourself, set "
                    "checkpoint.trust_pickle=true to load it with DeepSpeed")
            raise reshard.CheckpointError(
                f"{path}: no layout-free record ({reshard.RECORD}/meta.json is missing)")
        if native and trust and (meta is None or meta["layout"] == self._layout()):
            self.loaded_from = "DeepSpeed native files (checkpoint.trust_pickle)"
            loaded, client = self.ds.load_checkpoint(directory, tag=tag,
                                                     load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
            if loaded is None:
                raise reshard.CheckpointError(f"{path}: DeepSpeed found no checkpoint to load")
            return client or {}
        self.loaded_from = "layout-free record" + (
            f" (DeepSpeed's {', '.join(native)} not read: checkpoint.trust_pickle is off)"
            if native and not trust else "")
        record = reshard.Record(path)
        self.optim_state.materialize()
        reshard.load_shards(record, list(self._local_params()), self.optim_state.set,
                            vocab_size=self.cfg.model.vocab_size, tp_rank=parallel.tp_rank(),
                            tp=self.dims.tp)
        self.optim_state.refresh_low_precision()
        self.optim_state.set_adam_step(int(meta["adam_step"]))
        self._set_counters(meta.get("engine", {}))
        dist.barrier()
        return dict(meta.get("client", {}))

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Initialise from full canonical weights (a model directory, ModelScope or Hugging Face
        import) at any layout; the optimizer starts fresh (zero moments, step 0)."""
        from megagpt import parallel
        from megagpt.checkpoint import reshard

        self.optim_state.materialize()
        for name, p, shape, dim in self._local_params():
            if name not in tensors:
                raise reshard.CheckpointError(f"{source}: missing tensor {name!r} (the model "
                                              f"expects shape {shape})")
            self.optim_state.set(p, "param", reshard.local_shard(
                name, tensors[name], shape, dim, self.cfg.model.vocab_size, parallel.tp_rank(),
                self.dims.tp, source))
        self.optim_state.refresh_low_precision()
        dist.barrier()

    def fp32_value(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full fp32 master value of a (local, TP-sharded) parameter, whatever the ZeRO
        stage and precision. Collective over data parallel under ZeRO: call it on every rank
        for the same parameters in the same order."""
        return self.optim_state.fp32_value(p)

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """True when every rank's weights are finite (checked before a save or an export, so
        neither ever writes NaN/Inf). Collective over the world.

        Cheap: one ``isfinite().all()`` per local tensor, one all-reduce. It reads the copy the
        forward uses (ZeRO-3: this rank's partition); every optimizer wrapper writes its fp32
        master into that copy after each step, so a non-finite master shows there too."""
        flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all()
                 for p in self.ds.module.parameters()]
        ok = torch.stack(flags).all().to(self.device, torch.float32) if flags \
            else torch.ones((), device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

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

    def _skip_nonfinite_plain_step(self) -> None:
        """fp32 at ZeRO 0 (torch's AdamW stepped by DeepSpeed directly): skip the optimizer
        step when the global grad norm is NaN/Inf, as DeepSpeed's wrappers do themselves
        (``BF16_Optimizer``, ZeRO 1-3 and fp16 skip on an invalid norm; ``ds_config.py`` keeps
        bf16's check on). Without this a NaN gradient is stepped into every weight.

        DeepSpeed's ``_take_model_step`` clips (our ``_record_fp32_grad_norm`` keeps the norm),
        calls ``optimizer.step()``, zeroes the gradients and counts the step as skipped when
        ``optimizer.overflow`` is set: the same contract its own wrappers follow. The norm is
        reduced over model parallel and the gradients are already all-reduced over data
        parallel, so every rank takes the same decision."""
        optimizer = self.ds.optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            return
        from deepspeed.runtime.utils import clip_grad_norm_

        ds, step = self.ds, optimizer.step

        def step_if_finite(*args, **kwargs):
            if ds.gradient_clipping() <= 0:  # no clip, so the hook above computed no norm
                ds._global_grad_norm = clip_grad_norm_(
                    parameters=ds.module.parameters(), max_norm=float("inf"), mpu=ds.mpu)
            norm = ds._global_grad_norm
            optimizer.overflow = norm is not None and not bool(torch.isfinite(
                torch.as_tensor(norm)).all())
            if optimizer.overflow:
                return None
            return step(*args, **kwargs)

        optimizer.overflow = False
        optimizer.step = step_if_finite

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
