"""Save / resume training checkpoints; the consolidated model directory; converters.

Names are imported on first use (``megagpt.lazy``), so a torch-free submodule such as
``megagpt.checkpoint.tags`` (read by ``megagpt.planner.run_state`` at every Slurm job start)
imports without torch or megatron-core.
"""

from megagpt.lazy import lazy_getattr

_MANAGER = "megagpt.checkpoint.manager"
_MODEL_DIR = "megagpt.checkpoint.model_dir"
_EXPORTS = {
    "CheckpointError": "megagpt.checkpoint.canonical",
    "ModelDirError": _MODEL_DIR,
    "checkpoint_dir": _MANAGER,
    "commit": _MANAGER,
    "is_model_dir": _MODEL_DIR,
    "latest_tag": _MANAGER,
    "load_into": _MODEL_DIR,
    "load_tensors": _MODEL_DIR,
    "read_config": _MODEL_DIR,
    "resolve_load": _MANAGER,
    "resume_tag": _MANAGER,
    "tag_for": _MANAGER,
    "tokenizer_path": _MODEL_DIR,
    "verify_or_raise": _MANAGER,
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
