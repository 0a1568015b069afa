"""Generation: sampling, the KV-cache decoding loop, the text-generation pipeline."""

from megagpt.inference.generate import DecodeState, TextGenerator
from megagpt.inference.pipeline import TextGenerationPipeline, load_generator, pipeline
from megagpt.inference.sampling import SamplingParams, make_params, sample

__all__ = ["DecodeState", "SamplingParams", "TextGenerationPipeline", "TextGenerator",
           "load_generator", "make_params", "pipeline", "sample"]
