"""The training engine: the model wrapped by DeepSpeed, one optimizer step, evaluation, and the
hand-over of tensors to the checkpoint format (``checkpoint_state``; the format itself is
``megagpt.checkpoint.training``'s).

Pipeline parallelism (PP > 1) uses DeepSpeed's PipelineModule/PipelineEngine (1F1B) with the tied
embedding shared by the first and last stage; PP = 1 uses the plain DeepSpeedEngine, which allows
ZeRO stages 0-3. deepspeed is imported through ``accelerator.import_deepspeed(device)`` only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megagpt.checkpoint.training import EngineState, LocalParam
from megagpt.config.schema import Config
from megagpt.engine.accelerator import import_deepspeed, quiet_memory_reports
from megagpt.engine.ds_config import deepspeed_config, deepspeed_zero_stage
from megagpt.engine.optim_state import adapter_for
from megagpt.model.compile import compile_decoder_layers, compile_enabled, compile_seconds
from megagpt.model.cpu_training import cpu_kernels_enabled
from megagpt.model.layers import use_cpu_kernels
from megagpt.model.matmul import cpu_matmul_enabled, use_onednn
from megagpt.model.gpt import GPTModel, gpt_blocks
from megagpt.model.layers import lm_loss
from megagpt.model.mcore import megatron_config
from megagpt.model.rng import TensorParallelRNG
from megagpt.parallel import MegatronMPU, ParallelContext, ParallelDims


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms (1-d) or positions."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _pipeline_module(
    cfg: Config, mp: Any, dims: ParallelDims, device: torch.device
) -> torch.nn.Module:
    """This rank's pipeline stage, built by DeepSpeed from ``gpt_blocks``."""
    import_deepspeed(device)
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megagpt.checkpoint.canonical import WORD_ATTR

    rng = TensorParallelRNG()
    specs: list[Any] = []
    for block in gpt_blocks(cfg.model, mp, cfg.parallel.recompute, rng):
        if block.tie is None:
            specs.append(LayerSpec(block.cls, *block.args))
            continue
        forward = (
            None
            if block.method == "forward"
            else (lambda module, h, name=block.method: getattr(module, name)(h))
        )
        specs.append(
            TiedLayerSpec(
                block.tie, block.cls, *block.args, forward_fn=forward, tied_weight_attr=WORD_ATTR
            )
        )
    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    method = "type:DecoderLayer" if cfg.parallel.pipeline_partition == "uniform" else "parameters"
    module = PipelineModule(
        layers=specs,
        topology=topo,
        partition_method=method,
        loss_fn=lambda logits, target: lm_loss(logits, target[0], target[1]),
    )
    module.dropout_rng = rng  # the same attribute GPTModel has
    return module


def build_model(cfg: Config, dims: ParallelDims, device: torch.device) -> torch.nn.Module:
    """The local part of the GPT: the whole model (PP=1) or this rank's pipeline stage.

    ``dims`` and ``device`` are the run's (``ParallelContext.dims``, ``.device``); the device
    chooses DeepSpeed's accelerator (the model itself is built on the CPU and moved by the
    engine), whether ``train.compile`` = auto compiles the decoder layers and whether
    ``train.cpu_matmul`` = auto puts the fp32 GEMMs on oneDNN and ``train.cpu_kernels`` = auto
    the attention and the MLP's bias + GELU on our CPU kernels. Call it after
    ``megagpt.parallel.initialize``: DeepSpeed's communication layer wraps that process group."""
    mp = megatron_config(cfg.model, cfg.parallel, torch.float32)
    deepspeed = import_deepspeed(device)
    # deepspeed.comm wraps the torch.distributed group that megagpt.parallel already started.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    if dims.pp > 1:
        module = _pipeline_module(cfg, mp, dims, device)
    else:
        module = GPTModel(cfg.model, mp, cfg.parallel.recompute)
    if cpu_matmul_enabled(cfg.train.cpu_matmul, device):
        use_onednn(module)  # fp32 CPU GEMMs on oneDNN (megagpt/model/matmul.py)
    if cpu_kernels_enabled(cfg.train.cpu_kernels, device):
        use_cpu_kernels(module)  # attention and bias + GELU (megagpt/model/cpu_training.py)
    if compile_enabled(cfg.train.compile, device):
        compile_decoder_layers(module)  # lazily: the graphs are built in the first step
    return module


def deepspeed_local_rank(ctx: ParallelContext) -> None:
    """Give DeepSpeed the ``LOCAL_RANK`` it reads from the environment, for a lone process.

    DeepSpeed reads the variable (no argument replaces it) when its engine or pipeline module
    is built, and under ZeRO-3 during steps; a launcher always sets it. A process no launcher
    started is the only local rank there is, so "0" is what any later reader (DeepSpeed, a
    child process) should see. It is set only there: other processes' launchers decide.
    """
    if ctx.dims.world == 1 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = "0"


class Engine:
    """One training engine for every layout: ``train_step`` runs one global batch.

    ``ctx`` is this process's ``ParallelContext`` (from ``megagpt.parallel.initialize``): the
    engine reduces over its groups, places tensors on its device and hands its coordinates to
    the checkpoint format."""

    def __init__(self, cfg: Config, module: torch.nn.Module, ctx: ParallelContext):
        if ctx.dp_group is None or ctx.tp_group is None or ctx.mp_group is None:
            raise ValueError(
                "Engine needs the process groups of megagpt.parallel.initialize(); "
                "this ParallelContext has none"
            )
        self.cfg, self.ctx = cfg, ctx
        self.dims, self.device = ctx.dims, ctx.device
        device = ctx.device
        self.pipeline = ctx.dims.pp > 1
        module.to(device)
        o = cfg.optim
        groups = _param_groups(module, o.weight_decay)
        # torch's fused AdamW (one kernel per parameter for the whole update) exists for CUDA
        # and CPU; elsewhere the default (foreach / for-loop) implementation.
        fused = device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused
        )
        ds_cfg = deepspeed_config(cfg, ctx.dims.world)
        deepspeed = import_deepspeed(device)
        deepspeed_local_rank(ctx)
        with quiet_memory_reports():
            self.ds, self.optimizer, _, _ = deepspeed.initialize(
                model=module,
                optimizer=optimizer,
                config=ds_cfg,
                mpu=None if self.pipeline else MegatronMPU(ctx),
                dist_init_required=False,
            )
        # Chosen once: where this DeepSpeed optimizer wrapper keeps fp32 masters and moments.
        self.optim_state = adapter_for(self.ds.optimizer, device)
        self._sp_hooks(module)
        self._record_fp32_grad_norm()
        self._skip_nonfinite_plain_step()
        self._no_allreduce_alone()
        # train.compile: the graphs are built lazily in the first step, which reports the time.
        self._compile_pending = compile_enabled(cfg.train.compile, device)

    @property
    def dropout_rng(self) -> TensorParallelRNG:
        """The tensor-parallel region's dropout stream of the local model part."""
        return self.ds.module.dropout_rng

    def describe_precision(self) -> str:
        """One line on how gradients are accumulated and which optimizer wrapper runs."""
        t, stage = self.cfg.train, deepspeed_zero_stage(self.cfg, self.dims.world)
        accum = "fp32" if t.precision in ("fp32", "bf16") else t.precision
        note = (
            f" for parallel.zero_stage={self.cfg.parallel.zero_stage} (see "
            "megagpt/engine/ds_config.py)"
            if stage != self.cfg.parallel.zero_stage
            else ""
        )
        return (
            f"{t.precision} parameters, {accum} gradient accumulation; DeepSpeed ZeRO "
            f"{stage}{note} with {type(self.ds.optimizer).__name__}"
        )

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
        rank), the global grad norm, the loss scale (and, after the first step with
        ``train.compile`` on, ``compile_s``: the seconds torch.compile took) and whether the
        step was skipped: a
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
                dist.all_reduce(loss, group=self.ctx.dp_group)
                loss /= self.dims.dp
        norm = self.ds.get_global_grad_norm()
        out = {
            "loss": float(loss),
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "loss_scale": float(getattr(self.ds.optimizer, "cur_scale", 1.0) or 1.0),
            "skipped": self.ds.skipped_steps > skipped_before,
        }
        if self._compile_pending:
            self._compile_pending = False
            out["compile_s"] = compile_seconds()  # this process's torch.compile time so far
        return out

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[dict]) -> float:
        """Mean loss over ``micro_batches`` and data-parallel ranks, without a step."""
        self.ds.eval()
        if self.pipeline:
            loss = self.ds.eval_batch(
                iter(self._pipe_batches(micro_batches)), num_micro_batches=len(micro_batches)
            )
            return float(loss)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            tokens, labels, mask = self._to_device(mb)
            total += self.ds(tokens, labels, mask).float()
        loss = total / len(micro_batches)
        if self.dims.dp > 1:
            dist.all_reduce(loss, group=self.ctx.dp_group)
            loss /= self.dims.dp
        return float(loss)

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_state(self) -> EngineState:
        """The adapter through which ``megagpt.checkpoint.training`` (the one owner of the
        training-checkpoint format) reads and writes this engine: local parameters, the
        optimizer-state adapter, counters, the dropout stream, DeepSpeed's native files, and
        this rank's place in the layout."""
        return EngineState(
            params=lambda skip_tied_copy: self._local_params(skip_tied_copy),
            optim=self.optim_state,
            counters=self._counters,
            set_counters=self._set_counters,
            layout=self._layout(),
            model=self.cfg.model,
            dropout_rng=self.dropout_rng,
            save_native=self._save_native,
            load_native=self._load_native,
            parallel=self.ctx,
        )

    def _save_native(self, directory: str, tag: str, client_state: dict) -> None:
        """DeepSpeed's own files (pickles) of ``directory/tag`` (checkpoint.native)."""
        self.ds.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def _load_native(self, directory: str, tag: str) -> dict[str, Any] | None:
        """Load DeepSpeed's own files (pickles: the caller checked checkpoint.trust_pickle);
        the client state saved with them, or None when DeepSpeed found nothing."""
        loaded, client = self.ds.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        return None if loaded is None else (client or {})

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Initialise from full canonical weights (a model directory, ModelScope or Hugging Face
        import) at any layout; the optimizer starts fresh (zero moments, step 0)."""
        from megagpt.checkpoint.canonical import CheckpointError, local_shard

        self.optim_state.materialize()
        for name, p, shape, dim in self._local_params():
            if name not in tensors:
                raise CheckpointError(
                    f"{source}: missing tensor {name!r} (the model expects shape {shape})"
                )
            self.optim_state.set(
                p,
                "param",
                local_shard(
                    name,
                    tensors[name],
                    shape,
                    dim,
                    self.cfg.model.vocab_size,
                    self.ctx.tp_rank,
                    self.dims.tp,
                    source,
                ),
            )
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
        flags = [
            torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in self.ds.module.parameters()
        ]
        ok = (
            torch.stack(flags).all().to(self.device, torch.float32)
            if flags
            else torch.ones((), device=self.device)
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    # -- checkpoint helpers: the fp32 master and Adam state, whatever the ZeRO stage ------
    def _layout(self) -> dict[str, Any]:
        return {
            "tp": self.dims.tp,
            "pp": self.dims.pp,
            "dp": self.dims.dp,
            "zero_stage": self.cfg.parallel.zero_stage,
            "precision": self.cfg.train.precision,
        }

    def _local_params(self, skip_tied_copy: bool = False) -> Iterator[LocalParam]:
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

    def _counters(self) -> dict[str, Any]:
        scale = getattr(self.ds.optimizer, "cur_scale", None)
        return {
            "global_steps": self.ds.global_steps,
            "global_samples": self.ds.global_samples,
            "skipped_steps": self.ds.skipped_steps,
            "loss_scale": float(scale) if scale is not None else None,
        }

    def _set_counters(self, c: dict[str, Any]) -> None:
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
    def _to_device(
        self, mb: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = mb["tokens"].to(self.device, non_blocking=True)
        labels = mb["labels"].to(self.device, non_blocking=True)
        mask = mb["loss_mask"].to(self.device, non_blocking=True)
        return tokens, labels, mask

    def _pipe_batches(
        self, micro_batches: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        return [(mb["tokens"], (mb["labels"], mb["loss_mask"].float())) for mb in micro_batches]

    def _plain_grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the model's gradients on DeepSpeed's plain fp32 path.

        Each gradient counted once: TP-replicated parameters on TP rank 0 only, the pipeline's
        tied word embedding on its owning stage only (DeepSpeed marks the other copy
        ``ds_pipe_replicated``), then summed over the TP x PP group. DeepSpeed's own
        ``clip_grad_norm_`` does neither for a pipeline grid (measured at PP=2: 1.471 for a true
        1.457). Gradients are already averaged over data parallel, so every DP rank agrees."""
        tp_rank = self.ctx.tp_rank
        grads = [
            p.grad.detach()
            for p in self.ds.module.parameters()
            if p.grad is not None
            and not getattr(p, "ds_pipe_replicated", False)
            and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
        ]
        if not grads:
            squares = torch.zeros((), dtype=torch.float32, device=self.device)
        elif self.device.type == "cpu" and all(g.dtype == torch.float32 for g in grads):
            # The BLAS's dot product of each gradient with itself: on a CPU it reads fp32 at
            # ~2x the rate of torch's norm kernels (2-core Zen 4: 0.09 vs 0.25 ms for 9.4 MB,
            # 9 vs 18 ms a step at gpt3-base) and sums more accurately (relative error 1e-5 vs
            # 8e-5 against fp64 there).
            squares = torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum()
        else:  # one multi-tensor kernel for all the per-tensor norms (one launch on a GPU)
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            squares = torch.stack(list(norms)).square().sum()
        group = self.ctx.mp_group
        if self.dims.tp * self.dims.pp > 1:
            dist.all_reduce(squares, group=group)
        return squares.sqrt()

    def _record_fp32_grad_norm(self) -> None:
        """DeepSpeed's plain fp32 path (ZeRO 0, no bf16/fp16 wrapper) clips gradients but drops
        the norm it computed, and computes it wrongly under a pipeline (``_plain_grad_norm``):
        clip with our norm and keep it, so every layout reports and clips by the same norm."""
        ds = self.ds

        def clip_and_record():
            norm = self._plain_grad_norm()
            ds._global_grad_norm = norm
            max_norm = ds.gradient_clipping()
            if max_norm > 0 and torch.isfinite(norm):
                coef = max_norm / (norm + 1e-6)
                fused = getattr(ds.optimizer, "defaults", {}).get("fused", False)
                if fused:  # torch's fused AdamW divides by grad_scale inside its one pass
                    ds.optimizer.grad_scale = 1.0 / coef if coef < 1.0 else None
                elif coef < 1.0:
                    torch._foreach_mul_(
                        [p.grad.detach() for p in ds.module.parameters() if p.grad is not None],
                        coef,
                    )

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
        if not isinstance(self.ds.optimizer, torch.optim.Optimizer):
            return
        # DeepSpeed's contract adds an ``overflow`` attribute to the optimizer and we replace
        # its ``step``: neither is in torch's Optimizer type, hence Any.
        optimizer: Any = self.ds.optimizer
        ds, step = self.ds, optimizer.step

        def step_if_finite(*args, **kwargs):
            if ds.gradient_clipping() <= 0:  # no clip, so the hook above computed no norm
                ds._global_grad_norm = self._plain_grad_norm()
            norm = ds._global_grad_norm
            optimizer.overflow = norm is not None and not bool(
                torch.isfinite(torch.as_tensor(norm)).all()
            )
            if optimizer.overflow:
                return None
            return step(*args, **kwargs)

        optimizer.overflow = False
        optimizer.step = step_if_finite

    def _no_allreduce_alone(self) -> None:
        """Data-parallel size 1 on the plain path (ZeRO 0, torch's optimizer) or bf16's
        ``BF16_Optimizer``: DeepSpeed (and its pipeline engine) would still flatten every
        gradient (bf16: the fp32 accumulated ones, 4 bytes a parameter) into buckets, all-reduce
        them over a group of one and copy them back at each accumulation boundary. Nothing to
        average: skip it (at gpt3-base in bf16 on a CPU that pass was a quarter of the step).
        The BF16_Optimizer moves its gradients into fp32 on its own, which still runs, and the
        pipeline still sums the tied embedding's gradients across its stages. Other wrappers
        (ZeRO 1-3 partitioning, fp16) keep their reduction, which also moves their
        gradients."""
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        if self.dims.dp == 1 and isinstance(
            self.ds.optimizer, torch.optim.Optimizer | BF16_Optimizer
        ):
            self.ds.enable_backward_allreduce = False
            if self.pipeline:
                self.ds.pipeline_enable_backward_allreduce = False

    @property
    def reduces_over_data_parallel(self) -> bool:
        """Whether DeepSpeed all-reduces the gradients over the data-parallel group after the
        backward (False where ``_no_allreduce_alone`` found nothing to average)."""
        flag = (
            "pipeline_enable_backward_allreduce" if self.pipeline else "enable_backward_allreduce"
        )
        return bool(getattr(self.ds, flag))

    def _sp_hooks(self, module: torch.nn.Module) -> None:
        """Sequence parallel: replicated parameters see s/tp tokens per rank, so their grads
        are summed over the TP group (megatron-core leaves this to its DDP, which we do not
        use)."""
        if not self.cfg.parallel.sequence_parallel:
            return
        group = self.ctx.tp_group

        def reduce(grad: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(grad, group=group)
            return grad

        for p in module.parameters():
            if getattr(p, "sequence_parallel", False):
                p.register_hook(reduce)
