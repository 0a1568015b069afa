"""Save / resume training checkpoints; the consolidated model directory."""

from megagpt.checkpoint.manager import (
    checkpoint_dir,
    commit,
    latest_tag,
    resolve_load,
    resume_tag,
    tag_for,
    verify_or_raise,
)
from megagpt.checkpoint.model_dir import (
    ModelDirError,
    is_model_dir,
    load_into,
    load_tensors,
    read_config,
    tokenizer_path,
)

__all__ = ["ModelDirError", "checkpoint_dir", "commit", "is_model_dir", "latest_tag",
           "load_into", "load_tensors", "read_config", "resolve_load", "resume_tag", "tag_for",
           "tokenizer_path", "verify_or_raise"]
