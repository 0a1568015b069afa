"""Cluster planning: memory and step-time models, layout search, `megagpt plan`, the
`train --dry-run`, and the run-state helper the Slurm launcher uses. Imports no megatron-core
at module level (the dry run builds blocks on the meta device lazily)."""
