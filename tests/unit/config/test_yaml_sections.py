"""YAML recipes: duplicate keys are errors with both lines, an empty section means its defaults,
a section that is not a mapping says so."""

from __future__ import annotations


import pytest

from megagpt.config import ConfigError, load_config
from megagpt.config.schema import TrainConfig
from tests.unit.config.test_config import _write


def test_duplicate_key_in_a_section_names_both_lines(tmp_path):
    p = _write(tmp_path, "model:\n  name: gpt3-tiny\ntrain:\n  steps: 99\n  steps: 5\n")
    with pytest.raises(
        ConfigError, match=r"recipe.yaml:5: duplicate key 'train.steps' \(also at line 4\)"
    ):
        load_config(p)


def test_duplicate_section_names_both_lines(tmp_path):
    p = _write(tmp_path, "model:\n  name: gpt3-tiny\ntrain:\n  steps: 10\ntrain:\n  seed: 3\n")
    with pytest.raises(
        ConfigError, match=r"recipe.yaml:5: duplicate key 'train' \(also at line 3\)"
    ):
        load_config(p)


def test_duplicate_key_inside_a_list_entry(tmp_path):
    p = _write(
        tmp_path,
        "data:\n  weights_schedule:\n    - tokens: 0\n      weights: [1, 0]\n      tokens: 5\n",
    )
    with pytest.raises(
        ConfigError,
        match=r"recipe.yaml:5: duplicate key 'data.weights_schedule\[0\].tokens' "
        r"\(also at line 3\)",
    ):
        load_config(p)


def test_same_key_in_different_sections_is_fine(tmp_path):
    cfg = load_config(_write(tmp_path, "model:\n  seq_length: 64\nfinetune:\n  seq_length: 32\n"))
    assert (cfg.model.seq_length, cfg.finetune.seq_length) == (64, 32)


def test_empty_section_means_its_defaults(tmp_path):
    p = _write(tmp_path, "model:\n  name: gpt3-tiny\ntrain:\n  # steps: 10\nlogging:\n")
    assert load_config(p) == load_config(None, ["model.name=gpt3-tiny"])
    assert load_config(_write(tmp_path, "train:\n")).train == TrainConfig()


def test_empty_unknown_section_is_still_unknown(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.yaml:1: unknown key 'trian' .*'train'"):
        load_config(_write(tmp_path, "trian:\n  # steps: 10\n"))


@pytest.mark.parametrize("body", ["5", "[1, 2]", "fast"])
def test_section_that_is_not_a_mapping(tmp_path, body):
    p = _write(tmp_path, f"model:\n  name: gpt3-tiny\ntrain: {body}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:3: section 'train' must be a mapping"):
        load_config(p)
