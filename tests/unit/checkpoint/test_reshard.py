"""Reading the layout-free record into a model (``reshard.load_shards``), without a process
group: every tensor the model holds must come from the record, and every tensor of the record
must have a place in the model."""

from __future__ import annotations

import pytest
import torch

from megagpt.checkpoint import reshard
from megagpt.checkpoint.canonical import CheckpointError, expected_shapes, partition_dim
from tests.unit.checkpoint.conftest import random_state, small_config


def _params(cfg):
    """(name, parameter, full shape, partition dim) of a whole model ``cfg`` at TP=1."""
    return [
        (name, torch.nn.Parameter(torch.zeros(shape)), shape, partition_dim(name))
        for name, shape in expected_shapes(cfg).items()
    ]


def _load(record, cfg, params):
    got = {}
    reshard.load_shards(
        record,
        params,
        lambda p, kind, t: got.setdefault(kind, []).append(t),
        model=cfg,
        tp_rank=0,
        tp=1,
    )
    return got


def test_a_record_loads_into_the_model_it_was_saved_from(tmp_path):
    cfg = small_config()
    state = random_state(cfg)
    reshard.write_record(str(tmp_path / "ck"), {"param": state}, cfg, tp=2, pp=2)
    params = _params(cfg)
    got = _load(reshard.Record(str(tmp_path / "ck")), cfg, params)
    assert len(got["param"]) == len(state)
    for (name, *_), t in zip(params, got["param"], strict=True):
        assert torch.equal(t, state[name])


def test_tensors_the_model_has_no_place_for_are_refused_naming_one(tmp_path):
    """A 4-layer record read into a 2-layer model: layers 2 and 3 would be dropped silently."""
    saved = small_config(num_layers=4)
    reshard.write_record(str(tmp_path / "ck"), {"param": random_state(saved)}, saved, tp=1, pp=1)
    cfg = small_config(num_layers=2)
    with pytest.raises(CheckpointError) as err:
        _load(reshard.Record(str(tmp_path / "ck")), cfg, _params(cfg))
    msg = str(err.value)
    assert "tensor 'layers.2." in msg
    assert "tp00-pp00.param.safetensors" in msg
    assert "the model has no place for it" in msg
