"""megagpt: pretrain, fine-tune and serve the Chinese GPT-3 family, from laptop CPU to cluster."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from megagpt import pipeline` without importing torch/megatron-core at `import megagpt`.
    if name == "pipeline":
        from megagpt.inference.pipeline import pipeline

        return pipeline
    raise AttributeError(f"module 'megagpt' has no attribute {name!r}")
