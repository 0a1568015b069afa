"""The one translation of megagpt's config into megatron-core's config type."""

from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig

from megagpt.config.schema import ModelConfig, ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def megatron_config(
    model: ModelConfig, parallel: ParallelConfig, params_dtype: torch.dtype = torch.float32
) -> ModelParallelConfig:
    """ModelParallelConfig for megatron-core's parallel layers.

    We initialise weights ourselves (``megagpt.model.init``), so megatron-core only allocates:
    ``perform_initialization=False`` and CPU allocation, which works for gloo and NCCL alike
    (the trainer moves the model to its device afterwards).
    """
    del model  # the parallel layers take their shapes as arguments, not from this config
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        gradient_accumulation_fusion=False,
        # DeepSpeed owns the step; megatron-core's DDP/schedule hooks stay unused.
        async_tensor_model_parallel_allreduce=False,
    )
