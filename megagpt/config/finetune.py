"""The ``finetune`` section: data files, columns, sample length, epochs, evaluation, start point.

Used by ``megagpt finetune`` only; ``megagpt train`` ignores it. The other sections (model,
parallel, optim, train, checkpoint, logging, run) mean what they mean for pretraining, with
``train.steps`` capping the run (0 = run every epoch) and ``optim.schedule: noam`` the original
fine-tuning schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from megagpt.config.fields import doc


@dataclass
class FinetuneConfig:
    train_file: str = doc(
        "", "Training data: .jsonl (one JSON object a line) or .csv with a header."
    )
    eval_file: str = doc("", "Evaluation data in the same format; empty = no evaluation.")
    src_column: str = doc("src_txt", "Column read as src_txt (e.g. text1 for the poetry set).")
    tgt_column: str = doc(
        "tgt_txt", "Column read as tgt_txt; when the data has it, the loss is on the target only."
    )
    mode: str = doc(
        "auto",
        "auto = src+tgt when the tgt column exists, else continuation (loss on every token).",
        choices=("auto", "continuation", "src_tgt"),
    )
    seq_length: int = doc(
        128, "Tokens per sample (model input); longer samples are truncated, shorter right-padded."
    )
    epochs: int = doc(10, "Passes over the training data; evaluation runs after each.")
    shuffle: bool = doc(True, "Reshuffle the training samples every epoch (seeded by train.seed).")
    init_from: str = doc(
        "",
        "Start weights: a megagpt model directory or a training "
        "checkpoint (run dir / step folder); empty = from scratch.",
    )
    eval_batch_size: int = doc(8, "Evaluation sequences per micro-batch per data-parallel rank.")
    eval_max_new_tokens: int = doc(
        64, "src+tgt evaluation: greedy tokens generated per sample for BLEU / ROUGE-L."
    )
    eval_generate_limit: int = doc(
        0, "src+tgt evaluation: score only the first N samples (0 = all)."
    )
    eval_at_start: bool = doc(
        False, "Also evaluate before the first step (the starting model's figures)."
    )
