"""The pure pieces of a run's setup (megagpt.training.setup, finetune): seeds, the sample counts
of the indexed datasets, how batches split across data-parallel ranks, the tokenizer's say over
the vocabulary, and where the start weights come from. No process group."""

from __future__ import annotations

import types

import numpy as np
import pytest

from megagpt.config import Config, ConfigError
from megagpt.training import setup
from megagpt.training.finetune import EpochBatches, epoch_steps
from megagpt.training.setup import (
    IndexedBatches,
    StartWeights,
    indexed_sample_counts,
    reseed_after_layout_change,
    stage_seed,
)

# -- seeds --------------------------------------------------------------------------------


def test_seed_offsets_keep_the_values_runs_were_seeded_with():
    # Exact resume and a run's dropout masks depend on these numbers: a change would make a
    # resumed run (or a rerun) draw other masks than the run it continues.
    assert stage_seed(1234, 0) == 1234
    assert stage_seed(1234, 3) == 1234 + 300
    assert reseed_after_layout_change(1234, 2, 50) == 1234 + 200 + 7919 * 50


def test_every_stage_and_resume_step_gets_its_own_seed():
    seeds = {reseed_after_layout_change(42, pp, step) for pp in range(64) for step in range(64)}
    assert len(seeds) == 64 * 64
    assert len({stage_seed(42, pp) for pp in range(64)}) == 64


# -- indexed data sizes ----------------------------------------------------------------------


def _cfg(**train) -> Config:
    cfg = Config()
    cfg.model.seq_length = 100
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 16, 2
    cfg.train.steps, cfg.train.eval_interval, cfg.train.eval_iters = 10, 5, 3
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_train_samples_cover_the_decay_horizon_not_just_this_run():
    cfg = _cfg()
    cfg.optim.schedule, cfg.optim.decay_tokens = "cosine", 100_050.0
    assert indexed_sample_counts(cfg, dp=4) == (1001, 3 * 2 * 4)  # ceil(100050 / 100) samples
    cfg.optim.decay_tokens = 1_000.0  # a horizon shorter than the run: the run's samples
    assert indexed_sample_counts(cfg, dp=4)[0] == 10 * 16
    cfg.optim.schedule = "constant"  # no horizon
    cfg.optim.decay_tokens = 1e9
    assert indexed_sample_counts(cfg, dp=1)[0] == 10 * 16


def test_an_index_larger_than_memory_is_an_error_naming_the_keys(tmp_path):
    """A recipe left at the GPT-3 decay horizon (260B tokens) asked a short run's index for
    billions of samples: the build was killed for memory with no message. Now the size is
    checked against the free memory before anything is allocated."""
    from megagpt.data.gpt_dataset import IndexMemoryError
    from tests.unit.data.conftest import write_dataset

    prefix = write_dataset(tmp_path / "ds", [list(range(1, 40))] * 20)
    cfg = _cfg(eval_interval=0)
    cfg.model.seq_length = 8
    cfg.data.paths, cfg.data.split = [prefix], "100,0,0"
    cfg.optim.schedule, cfg.optim.decay_tokens = "cosine", 1e15  # 1.25e14 samples
    with pytest.raises(IndexMemoryError) as err:
        setup.build_indexed_data(cfg, 1, str(tmp_path / "run"))
    message = str(err.value)
    assert f"{prefix} (train split): the sample index of 125,000,000,000,000 samples" in message
    assert "GiB is available" in message
    assert "optim.decay_tokens / model.seq_length = 1e+15 / 8" in message
    assert "optim.decay_tokens=1280" in message  # this run's 10 x 16 samples of 8 tokens
    cfg.optim.decay_tokens = 1280.0
    train, _ = setup.build_indexed_data(cfg, 1, str(tmp_path / "run"))
    assert len(train) >= 160


def test_an_index_too_large_for_one_epoch_says_so(tmp_path, monkeypatch):
    """When one pass over the dataset alone exceeds the memory, fewer steps would not help:
    the hint says what would (a larger machine's shared cache, a split dataset)."""
    from megagpt.data import gpt_dataset
    from tests.unit.data.conftest import write_dataset

    prefix = write_dataset(tmp_path / "ds", [list(range(1, 1000))] * 200)  # ~25,000 samples
    monkeypatch.setattr(gpt_dataset, "available_memory", lambda: 100_000)
    cfg = _cfg(eval_interval=0)
    cfg.model.seq_length = 8
    cfg.data.paths, cfg.data.split = [prefix], "100,0,0"
    cfg.optim.schedule = "constant"  # the run's own 160 samples
    with pytest.raises(gpt_dataset.IndexMemoryError, match="One pass over the dataset") as err:
        setup.build_indexed_data(cfg, 1, str(tmp_path / "run"))
    assert "optim.decay_tokens" not in str(err.value) and "1 whole epoch" in str(err.value)


def test_the_index_memory_check_counts_samples_and_documents(monkeypatch):
    from megagpt.data import gpt_dataset

    lengths = np.full(100, 50, dtype=np.int32)  # 5,000 tokens an epoch
    monkeypatch.setattr(gpt_dataset, "available_memory", lambda: 30_000)
    gpt_dataset.build_sample_index(lengths, 0, 10, 400, 1)  # 499 samples: 24 kB + 2 kB
    with pytest.raises(gpt_dataset.IndexMemoryError, match="at least 0.0 GiB"):
        gpt_dataset.build_sample_index(lengths, 0, 10, 600, 1)  # 2 epochs: 48 kB + 4 kB
    monkeypatch.setattr(gpt_dataset, "available_memory", lambda: None)  # unknown: no check
    assert len(gpt_dataset.build_sample_index(lengths, 0, 10, 600, 1)["shuffle_idx"]) == 999


def test_no_validation_samples_without_evaluation():
    assert indexed_sample_counts(_cfg(eval_interval=0), dp=2)[1] == 0


# -- batches ----------------------------------------------------------------------------------


class _Tokens:
    """Sample i is the tokens [i, i, i] (so a batch shows which samples it holds)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"tokens": np.full(3, i, dtype=np.int32)}


def _samples(batches: list[dict]) -> list[list[int]]:
    return [mb["tokens"][:, 0].tolist() for mb in batches]


def test_indexed_batches_split_each_global_batch_across_dp_ranks():
    ds, micro, dp = _Tokens(100), 2, 3
    per_rank = [_samples(IndexedBatches(micro, r, dp)(ds, 12, 2)) for r in range(dp)]
    # Micro-step k of rank r: global samples 12 + k*micro*dp + r*micro ...
    assert per_rank == [[[12, 13], [18, 19]], [[14, 15], [20, 21]], [[16, 17], [22, 23]]]
    mb = IndexedBatches(micro, 0, dp)(ds, 0, 1)[0]
    assert mb["tokens"].shape == mb["labels"].shape == mb["loss_mask"].shape == (2, 2)


def test_indexed_batches_say_when_the_dataset_runs_out():
    with pytest.raises(RuntimeError, match="ran out of samples at 90"):
        IndexedBatches(2, 0, 2)(_Tokens(96), 90, 2)


class _Encoded:
    """A fine-tuning dataset whose sample i is the ids [i, i, i, i]."""

    def __init__(self, n: int):
        self.ids = np.arange(n)[:, None].repeat(4, 1)
        self.loss_mask = np.ones((n, 3), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)


def test_epoch_batches_give_dp_ranks_disjoint_samples_of_each_epoch():
    from megagpt.data.finetune import global_sample_indices

    n, micro, dp, per_epoch = 20, 2, 2, 16  # 16 of the 20 samples per epoch: 2 global batches
    ds = _Encoded(n)
    got = [_samples(EpochBatches(micro, r, dp, per_epoch, 7, True)(ds, 16, 2)) for r in range(dp)]
    flat = sorted(s for rank in got for mb in rank for s in mb)
    assert flat == sorted(global_sample_indices(16, 8, n, per_epoch, 7, True))
    assert len(set(flat)) == 8  # no sample twice in one global batch
    assert got[0][0] == global_sample_indices(16, 2, n, per_epoch, 7, True)  # rank 0 first


def test_epoch_steps_are_whole_global_batches_capped_by_train_steps():
    assert epoch_steps(50, 8, 3, 0) == (6, 18)  # 2 samples left over each epoch
    assert epoch_steps(50, 8, 3, 10) == (6, 10)
    assert epoch_steps(50, 8, 3, 100) == (6, 18)
    assert epoch_steps(5, 8, 3, 0) == (0, 0)


# -- tokenizer and start weights ------------------------------------------------------------------


def _fake_tokenizer(monkeypatch, vocab: int) -> None:
    import megagpt.data

    monkeypatch.setattr(
        megagpt.data, "build_tokenizer", lambda path: types.SimpleNamespace(vocab_size=vocab)
    )


def test_the_tokenizer_sets_the_vocabulary_unless_weights_fix_it(monkeypatch):
    _fake_tokenizer(monkeypatch, 1000)
    cfg = Config()
    cfg.data.tokenizer, cfg.model.vocab_size = "tok", 50000
    setup.load_tokenizer(cfg)
    assert cfg.model.vocab_size == 1000
    cfg.model.vocab_size = 50000
    with pytest.raises(ConfigError, match="finetune.init_from has a vocabulary of 50000"):
        setup.load_tokenizer(cfg, vocab_fixed_by="finetune.init_from")
    assert cfg.model.vocab_size == 50000
    cfg.data.tokenizer = ""
    with pytest.raises(ConfigError, match="data.tokenizer is empty"):
        setup.load_tokenizer(cfg)


def test_a_missing_checkpoint_load_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.load=.*nowhere.*does not exist"):
        setup.read_start_weights(
            str(tmp_path / "nowhere"), "checkpoint.load", training_as_weights=False
        )


class _Engine:
    def __init__(self):
        self.loaded = []

    def load_weights(self, tensors, source):
        self.loaded.append(source)


def _start(cfg: Config, **model) -> StartWeights:
    import dataclasses

    return StartWeights(
        "megagpt", "/models/a", "finetune.init_from", dataclasses.replace(cfg.model, **model), {}
    )


def test_start_weights_load_only_without_a_checkpoint_of_the_run(tmp_path):
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads = 2, 64, 4
    ctx = types.SimpleNamespace(pp_rank=0, tp_rank=0)
    checkpoints = types.SimpleNamespace(directory=str(tmp_path / "checkpoints"))
    engine = _Engine()
    state = setup.resume(cfg, ctx, engine, checkpoints, _start(cfg))
    assert engine.loaded == ["/models/a"] and (state.step, state.consumed_samples) == (0, 0)
    # checkpoint.load comes first: (here a path that does not exist) the start weights are
    # never reached.
    cfg.checkpoint.load = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="checkpoint.load"):
        setup.resume(cfg, ctx, engine, checkpoints, _start(cfg))
    assert engine.loaded == ["/models/a"]


def test_start_weights_of_another_model_are_refused_naming_each_key(tmp_path):
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads = 2, 64, 4
    engine = _Engine()
    with pytest.raises(ConfigError) as err:
        setup.load_start_weights(engine, cfg.model, _start(cfg, num_layers=4, hidden_size=128))
    assert "model.num_layers: 2 here, 4 there" in str(err.value)
    assert "model.hidden_size: 64 here, 128 there" in str(err.value)
    assert "finetune.init_from='/models/a'" in str(err.value)
    assert engine.loaded == []


# -- where the weights come from: checked before any process group starts ------------------------


class _ProcessGroupsStarted(Exception):
    """Raised in place of starting process groups: setup got past every check."""


def _no_process_groups(monkeypatch) -> None:
    def start(cfg):
        raise _ProcessGroupsStarted

    monkeypatch.setattr(setup, "start_process_groups", start)


def _run_cfg(tmp_path, **model) -> Config:
    import dataclasses

    from tests.unit.checkpoint.conftest import small_config

    cfg = Config()
    cfg.model = dataclasses.replace(small_config(**model))
    cfg.optim.lr = 1e-3
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 2, 1
    cfg.run.dir = str(tmp_path / "run")
    return cfg


def _training_checkpoint(directory, *, tp: int = 1, **model) -> str:
    """A committed training checkpoint (``latest`` + step_0000000) of a small GPT ``model``."""
    from megagpt.checkpoint.convert import Source, write_training
    from tests.unit.checkpoint.conftest import random_state, small_config

    cfg = small_config(**model)
    return write_training(str(directory), Source("megagpt", cfg, random_state(cfg)), tp=tp, pp=1)


def _build(cfg: Config) -> None:
    # Fine-tuning's entry (tokenizer and datasets given): no tokenizer file or data needed.
    setup.build_run(cfg, types.SimpleNamespace(), tokenizer=object(), datasets=(None, None))


def test_checkpoint_load_of_another_model_is_refused_before_any_process_group(
    tmp_path, monkeypatch
):
    _no_process_groups(monkeypatch)
    src = tmp_path / "src"
    _training_checkpoint(src / "checkpoints", num_layers=4, activation="gelu")
    cfg = _run_cfg(tmp_path, num_layers=2)
    cfg.checkpoint.load = str(src)
    with pytest.raises(ConfigError) as err:
        _build(cfg)
    msg = str(err.value)
    assert (
        f"checkpoint.load={src} (step_0000000): model.num_layers=2 but the checkpoint was "
        "trained with 4" in msg
    )
    assert "model.activation=gelu_tanh but the checkpoint was trained with gelu" in msg
    assert "hidden_size" not in msg  # only the keys that differ
    assert not (tmp_path / "run").exists()  # nothing written to run.dir


def test_the_runs_own_checkpoint_of_another_model_is_refused_before_any_process_group(
    tmp_path, monkeypatch
):
    _no_process_groups(monkeypatch)
    _training_checkpoint(tmp_path / "run" / "checkpoints", layernorm_eps=1e-12)
    cfg = _run_cfg(tmp_path, layernorm_eps=1e-5)
    cfg.checkpoint.load = str(tmp_path / "never-read")  # the run's own checkpoint comes first
    with pytest.raises(ConfigError) as err:
        _build(cfg)
    assert (
        f"run.dir={tmp_path / 'run'} (checkpoints/step_0000000): model.layernorm_eps=1e-05 "
        "but the checkpoint was trained with 1e-12" in str(err.value)
    )
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_new_layout_dropout_or_sequence_length_may_resume_a_checkpoint(tmp_path, monkeypatch):
    """Resharding (another TP size), dropout and a shorter sequence leave the weights' shapes
    and function alone: the checks let the run go on to its process groups."""
    _no_process_groups(monkeypatch)
    _training_checkpoint(tmp_path / "src", tp=2)
    cfg = _run_cfg(tmp_path, dropout=0.1, attention_dropout=0.1, seq_length=16)
    cfg.checkpoint.load = str(tmp_path / "src")
    with pytest.raises(_ProcessGroupsStarted):
        _build(cfg)


@pytest.mark.parametrize(
    "layout, error",
    [
        ("missing", r"checkpoint.load=.*nowhere.*does not exist"),
        ("empty", r"checkpoint.load=.*nowhere.*not a checkpoint megagpt knows"),
        ("dangling", r"checkpoint.load=.*nowhere.*latest names checkpoint 'step_0000009'"),
        ("no_record", r"checkpoint.load=.*step_0000001.*no layout-free record"),
    ],
)
def test_a_wrong_checkpoint_load_is_refused_before_any_process_group(
    tmp_path, monkeypatch, layout, error
):
    _no_process_groups(monkeypatch)
    where = tmp_path / "nowhere"
    if layout == "empty":
        where.mkdir()
    elif layout == "dangling":
        (where / "checkpoints").mkdir(parents=True)
        (where / "checkpoints" / "latest").write_text("step_0000009\n")
    elif layout == "no_record":
        where = where / "checkpoints" / "step_0000001"
        where.mkdir(parents=True)
    cfg = _run_cfg(tmp_path)
    cfg.checkpoint.load = str(where)
    with pytest.raises(ConfigError, match=error):
        _build(cfg)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_an_older_checkpoint_of_another_model(tmp_path):
    """After the process groups: the checkpoint resume_tag picked (it may fall back past a
    damaged newest one) is checked again before anything is loaded."""
    _training_checkpoint(tmp_path / "checkpoints", num_layers=4)
    cfg = _run_cfg(tmp_path, num_layers=2)
    ctx = types.SimpleNamespace(pp_rank=0, tp_rank=0)
    loaded = []
    checkpoints = types.SimpleNamespace(
        directory=str(tmp_path / "checkpoints"), load=lambda d, t: loaded.append(t)
    )
    with pytest.raises(
        ConfigError, match="model.num_layers=2 but the checkpoint was trained with 4"
    ):
        setup.resume(cfg, ctx, _Engine(), checkpoints)
    assert loaded == []
