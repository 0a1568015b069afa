"""Generation: sampling, the KV-cache decoding loop, the text-generation pipeline.

Names are imported on first use, so `megagpt.inference.cli` (and `megagpt --help`) stay light.
"""

from megagpt.lazy import lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _EXPORTS)
