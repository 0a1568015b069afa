"""Dataset loader of the ``megagpt_zh_mc`` lm-eval task: the jsonl next to this file."""

from __future__ import annotations

from pathlib import Path

ITEMS = Path(__file__).resolve().parent / "items.jsonl"


def load(**kwargs):
    """``{"test": Dataset}`` of the bundled items (lm-eval passes the task metadata as keyword
    arguments; none is needed)."""
    import datasets

    return datasets.DatasetDict(
        {"test": datasets.load_dataset("json", data_files=str(ITEMS), split="train")}
    )
