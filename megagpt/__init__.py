"""megagpt: pretrain, fine-tune and serve the Chinese GPT-3 family, from laptop CPU to cluster."""

import warnings

# The one version number: pyproject.toml reads it into the package metadata (a dynamic version).
__version__ = "0.1.0"

# megatron-core warns at import that Transformer Engine / apex are absent; both are optional
# for megagpt (torch kernels are used instead), so the warning is only noise.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def __getattr__(name: str):
    # `from megagpt import pipeline` without importing torch/megatron-core at `import megagpt`.
    if name == "pipeline":
        from megagpt.inference.pipeline import pipeline

        return pipeline
    raise AttributeError(f"module 'megagpt' has no attribute {name!r}")
