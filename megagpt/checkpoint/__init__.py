"""Save / resume training checkpoints (and, later, reshard and convert them)."""

from megagpt.checkpoint.manager import checkpoint_dir, commit, latest_tag, resolve_load, tag_for

__all__ = ["checkpoint_dir", "commit", "latest_tag", "resolve_load", "tag_for"]
