"""``megagpt finetune``'s own checks of its section, before any file is read or process starts."""

from __future__ import annotations

import pytest

from megagpt.config import ConfigError, load_config
from megagpt.training.finetune import prepare


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.epochs=0", "finetune.epochs must be >= 1"),
        ("finetune.seq_length=1", "finetune.seq_length must be >= 2"),
        ("finetune.eval_batch_size=0", "finetune.eval_batch_size must be >= 1"),
        ("finetune.eval_max_new_tokens=0", "finetune.eval_max_new_tokens must be >= 1, got 0"),
        ("finetune.eval_generate_limit=-2", "finetune.eval_generate_limit must be >= 0"),
    ],
)
def test_out_of_range_finetune_values_name_the_key(tmp_path, override, message):
    # A training file that does not exist: the range checks come first and name the key.
    cfg = load_config(None, [f"finetune.train_file={tmp_path / 'none.jsonl'}", override])
    with pytest.raises(ConfigError, match="invalid finetune config") as e:
        prepare(cfg)
    assert message in str(e.value)
