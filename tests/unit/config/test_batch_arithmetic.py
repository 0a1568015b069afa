"""global batch = micro x accumulation x DP: computed by one function, checked by validate."""

from __future__ import annotations

import pytest

from megagpt.config import ConfigError, accumulation_steps, grad_accumulation_steps, load_config
from megagpt.config.validate import problems


def _cfg(*extra: str):
    return load_config(None, ["model.name=gpt3-tiny", "data.paths=[x]", "data.tokenizer=t", *extra])


def test_accumulation_steps_multiply_back_to_the_global_batch():
    for gb, micro, dp in [(256, 2, 4), (8, 1, 8), (3072, 4, 3), (12, 12, 1)]:
        gas = accumulation_steps(gb, micro, dp)
        assert gas * micro * dp == gb


@pytest.mark.parametrize(
    "gb, micro, dp", [(10, 4, 1), (8, 1, 3), (2, 4, 1), (0, 1, 1), (8, 0, 1), (8, 1, 0)]
)
def test_a_batch_that_does_not_split_is_an_error_not_a_rounded_count(gb, micro, dp):
    # A bare // would run 2 micro-batches for a global batch of 10 at micro 4: 8 sequences.
    with pytest.raises(
        ConfigError,
        match=f"global batch of {gb} sequences .* micro-batches of "
        f"{micro} on {dp} data-parallel ranks",
    ):
        accumulation_steps(gb, micro, dp)


def test_grad_accumulation_steps_reads_the_config_and_takes_a_ramped_batch():
    cfg = _cfg("train.global_batch_size=64", "train.micro_batch_size=2", "parallel.tensor=2")
    assert grad_accumulation_steps(cfg, 8) == 64 // (2 * 4)  # DP = 8 / TP 2 = 4
    assert grad_accumulation_steps(cfg, 8, global_batch=16) == 2
    with pytest.raises(ConfigError):
        grad_accumulation_steps(cfg, 8, global_batch=12)


def test_a_batch_ramp_with_micro_batch_0_is_reported_not_a_crash():
    # The ramp's multiples of micro x DP used to be computed with micro 0: ZeroDivisionError.
    found = problems(
        _cfg("train.micro_batch_size=0", "train.rampup_batch_size=[2,2,100]"), 1, cuda=False
    )
    assert "train.micro_batch_size must be >= 1" in found
    assert not any("rampup" in p for p in found)


def test_a_batch_ramp_off_the_micro_x_dp_grid_is_reported():
    found = problems(
        _cfg("train.global_batch_size=8", "train.rampup_batch_size=[3,1,100]"), 2, cuda=False
    )
    assert any(
        p.startswith("train.rampup_batch_size: start and increment must be multiples")
        for p in found
    )
