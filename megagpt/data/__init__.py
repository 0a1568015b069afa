"""Data pipeline: tokenizers, preprocessing into indexed datasets, GPT samples, blending, sampler.

Public API (what the trainer and CLI use)::

    tok = build_tokenizer(path)
    train_ds, valid_ds, test_ds = build_gpt_datasets(prefixes, weights, split, seq_length,
                                                     num_samples, seed, cache_dir)
    sampler = DistributedBatchSampler(total_samples, consumed_samples, micro_batch_size,
                                      data_parallel_rank, data_parallel_size)

Nothing here imports torch; index building coordinates ranks through ``torch.distributed``
only when the caller has initialised a process group.
"""

from megagpt.data.blending import BlendedDataset
from megagpt.data.builder import build_gpt_datasets
from megagpt.data.errors import BadRecordError, DataError
from megagpt.data.gpt_dataset import GPTDataset
from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter
from megagpt.data.preprocess import PreprocessStats, preprocess
from megagpt.data.readers import InputSpec, make_input_spec
from megagpt.data.sampler import DistributedBatchSampler
from megagpt.data.tokenizer import Tokenizer, build_tokenizer
from megagpt.data.tokenizer_train import train_tokenizer

__all__ = [
    "BadRecordError",
    "BlendedDataset",
    "DataError",
    "DistributedBatchSampler",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "InputSpec",
    "PreprocessStats",
    "Tokenizer",
    "build_gpt_datasets",
    "build_tokenizer",
    "make_input_spec",
    "preprocess",
    "train_tokenizer",
]
