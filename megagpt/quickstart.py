"""`megagpt quickstart`: the README's first command, end to end on the bundled sample corpus.

1. trains a jieba-BPE tokenizer on megagpt/assets/sample_corpus.jsonl (once),
2. preprocesses the corpus into an indexed dataset (once),
3. pretrains the `configs/pretrain/tiny.yaml` recipe on the CPU, printing the loss as it falls
   and saving checkpoints and the final model directory into runs/quickstart/.
Running it again resumes (or, when finished, reports that there is nothing left to do).
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE = ASSETS / "sample_corpus.jsonl"
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
QUICKSTART_VOCAB = 4096


def prepare(tokenizer_dir: str, prefix: str) -> None:
    """Build the tokenizer and the indexed dataset the tiny recipe names, unless present."""
    from megagpt.data import make_input_spec, preprocess, train_tokenizer

    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        docs = (json.loads(line)["text"] for line in SAMPLE.read_text("utf-8").splitlines())
        tok = train_tokenizer(docs, tokenizer_dir, vocab_size=QUICKSTART_VOCAB)
        print(
            f"[megagpt] trained tokenizer on {SAMPLE.name}: {tok.vocab_size} tokens -> "
            f"{tokenizer_dir}",
            flush=True,
        )
    if not Path(prefix + ".idx").is_file():
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        stats = preprocess(
            [make_input_spec(str(SAMPLE))], tokenizer_dir, prefix, append_eod=True, progress=False
        )
        print(
            f"[megagpt] indexed dataset {prefix}: {stats.documents} documents, "
            f"{stats.tokens:,} tokens",
            flush=True,
        )


def run(overrides: list[str]) -> int:
    from megagpt.config import ConfigError, load_config
    from megagpt.training.trainer import train

    if not RECIPE.is_file():
        raise ConfigError(
            f"{RECIPE} not found: run the quickstart from a clone of megagpt (pip install -e .)"
        )
    cfg = load_config(RECIPE, overrides)
    prepare(cfg.data.tokenizer, cfg.data.paths[0])
    state = train(cfg)
    print(
        f"[megagpt] quickstart done: {state.step} steps; run directory {cfg.run.dir} "
        f"(config.yaml, metrics.jsonl, checkpoints/, model/)",
        flush=True,
    )
    return 0
