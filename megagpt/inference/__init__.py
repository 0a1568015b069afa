"""Generation: sampling, the KV-cache decoding loop, the text-generation pipeline.

Names are imported on first use, so `megagpt.inference.cli` (and `megagpt --help`) stay light.
"""

_EXPORTS = {
    "DecodeState": "megagpt.inference.generate",
    "TextGenerator": "megagpt.inference.generate",
    "TextGenerationPipeline": "megagpt.inference.pipeline",
    "load_generator": "megagpt.inference.pipeline",
    "pipeline": "megagpt.inference.pipeline",
    "SamplingParams": "megagpt.inference.sampling",
    "make_params": "megagpt.inference.sampling",
    "sample": "megagpt.inference.sampling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megagpt.inference' has no attribute {name!r}")
