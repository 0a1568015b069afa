"""``train.compile``: the decoder layers' training forward through ``torch.compile``.

Each ``DecoderLayer`` compiles its own ``_forward`` (LayerNorms, the QKV and output projections,
the MLP, the fused bias + GELU and bias + dropout + residual of ``fused.py``); the layers share
one code object, so the graph is traced once and reused by every layer (parameters are graph
inputs). Where dropout forks the tensor-parallel region's generator (attention dropout, residual
dropout under sequence parallelism) or the attention core is checkpointed (selective recompute),
that part runs eagerly inside the compiled layer (``torch.compiler.disable``, a graph break), so
the masks come from the same generator states as in eager mode. Inductor's random ops fall back
to aten's (``fallback_random``), so the default-stream dropout masks are the eager ones too: a
seeded step gives the same result eager or compiled, within float tolerance, and a resume is
exact either way. Generation and evaluation (a KV cache, or eval mode) stay eager.

``auto`` compiles on CUDA only. On CPU the step is ~80 % GEMMs, the same compiled or not:
measured on a 2-core CPU (bench/train_step.py, bench/trainer_e2e.py), compiled vs eager was
within run-to-run noise at gpt3-base (1.08-1.19x vs 1.08-1.15x HF) and slightly slower at the
trainer's default shape (0.97x vs 1.02x the plain loop), while a cold compile took ~70 s.
"""

from __future__ import annotations

import torch

COMPILE_CHOICES = ("auto", "always", "never")


def compile_enabled(setting: str, device: torch.device) -> bool:
    """Whether ``train.compile`` = ``setting`` compiles on ``device``: ``always``, ``never``,
    or ``auto`` = on CUDA only (see the module docstring)."""
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"train.compile={setting!r}: expected one of {COMPILE_CHOICES}")
    if setting == "auto":
        return device.type == "cuda"
    return setting == "always"


def compile_decoder_layers(module: torch.nn.Module) -> int:
    """Compile the training forward of every ``DecoderLayer`` in ``module`` (a whole GPT or a
    pipeline stage); returns how many. Compilation itself happens lazily at the first step."""
    import torch._inductor.config as inductor_config

    from megagpt.model.layers import DecoderLayer

    # Random ops through aten, not inductor's own generator: the same dropout masks as eager.
    inductor_config.fallback_random = True
    n = 0
    for m in module.modules():
        if isinstance(m, DecoderLayer):
            m.compile_forward(dynamic=False)
            n += 1
    return n


def compile_seconds() -> float:
    """Seconds spent so far in torch.compile in this process (dynamo tracing and inductor code
    generation, forward graphs and the lazily compiled backward graphs)."""
    from torch._dynamo.utils import compilation_time_metrics as times

    return sum(sum(times.get(k, ())) for k in ("_compile.compile_inner", "backward._backward_impl"))
