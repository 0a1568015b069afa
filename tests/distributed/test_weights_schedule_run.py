"""``data.weights_schedule`` reaches the training run: the trainer's train split follows the
schedule (the schedule's own properties: tests/unit/data/test_schedule.py)."""

from __future__ import annotations

from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import run_distributed


def blend_sources(config: str, overrides: list[str]) -> dict:
    """Build the trainer of ``config`` in this process; the dataset each train sample comes
    from, in order, and the tokens per sample."""
    from megagpt import parallel
    from megagpt.config import load_config
    from megagpt.training.trainer import Trainer

    trainer = Trainer(load_config(config, overrides))
    out = {"sources": trainer.train_ds.dataset_index.tolist(), "seq": trainer.cfg.model.seq_length}
    parallel.destroy()
    return out


def test_the_train_split_follows_a_two_phase_schedule(tiny_corpus, tmp_path):
    # The same corpus twice, so any mixture is possible: all from the first until 40 samples'
    # tokens, then a linear ramp to all from the second at 80 samples' tokens.
    prefix = tiny_corpus["prefix"]
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, tmp_path / "run")
    seq = 32  # gpt3-tiny's sequence length, checked below
    schedule = (
        f"[{{tokens: 0, weights: [1, 0]}}, {{tokens: {40 * seq}, weights: [1, 0]}}, "
        f"{{tokens: {80 * seq}, weights: [0, 1]}}]"
    )
    r = run_distributed(
        "tests.distributed.test_weights_schedule_run:blend_sources",
        1,
        config=str(recipe),
        overrides=[
            f"data.paths=[{prefix},{prefix}]",
            "train.steps=15",
            f"data.weights_schedule={schedule}",
        ],
    )[0]
    assert r["seq"] == seq
    sources = r["sources"]
    assert len(sources) >= 120
    assert set(sources[:40]) == {0}  # phase one: the first dataset only
    assert set(sources[81:120]) == {1}  # phase two: the second only
    ramp = sources[40:80]
    assert 0 < sum(ramp) < len(ramp)  # the ramp mixes them
