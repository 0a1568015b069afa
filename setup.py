"""megagpt: pretrain, fine-tune and serve the Chinese GPT-3 family on megatron-core + DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="megagpt",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megagpt", "megagpt.*"]),
    package_data={"megagpt": ["assets/*"], "megagpt.evaluation": ["tasks/*/*"]},
    install_requires=[
        # torch>=2.4 admits the CPU build already installed; a fresh GPU box gets a CUDA build.
        "torch>=2.4",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "numpy>=1.24",
        "wandb>=0.17",
        "tokenizers>=0.19",
        "jieba>=0.42",
        # BLEU / ROUGE-L of src+tgt fine-tuning evaluation.
        "sacrebleu>=2.4",
        "rouge-score>=0.1.2",
        # rjieba: the Rust port of jieba, ~18x faster segmentation (bench/preprocess.py).
        "rjieba>=0.1",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        # transformers is the peer for benchmarks and the HF export parity tests; the other
        # extras' packages so that CI runs the plot, eval (accelerate: lm-eval's `hf` model in
        # the parity test), serve and clean tests.
        "test": ["pytest>=8", "transformers>=4.40", "ruff>=0.5", "matplotlib>=3.7",
                 "tensorboard>=2.14", "lm-eval>=0.4.13", "accelerate>=0.26", "fastapi>=0.110",
                 "uvicorn>=0.29", "httpx>=0.27", "datasketch>=1.6",
                 "opencc-python-reimplemented>=0.1.7"],
        # `megagpt plot` (matplotlib) and logging.tensorboard=true (tensorboard).
        "plot": ["matplotlib>=3.7", "tensorboard>=2.14"],
        # `megagpt eval --tasks` and `python -m megagpt.evaluation.lm_eval_cli --model megagpt`.
        "eval": ["lm-eval>=0.4.13"],
        # `megagpt serve`: the OpenAI-compatible HTTP server.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # `megagpt clean`: MinHash near-duplicate removal; traditional -> simplified conversion.
        "data": ["datasketch>=1.6", "opencc-python-reimplemented>=0.1.7"],
    },
    entry_points={"console_scripts": ["megagpt=megagpt.cli:main"]},
)
