"""Throughput accounting: the FLOPs-per-token formula (the MFU numerator), the MFU
denominator (exact device, precision, TF32) and the logging window that leaves evaluation and
checkpoint time out of tokens/s. No GPU: device names are passed in, and the clock is a fake one
that tests advance by hand."""

from __future__ import annotations

import math
import types

import pytest
import torch

from megagpt.config import Config, from_name
from megagpt.training import metrics
from megagpt.training.metrics import (
    ThroughputWindow,
    device_peak_tflops,
    flops_per_token,
    peak_tflops,
)
from megagpt.training.precision import configure_matmul_precision, uses_tf32

H100_SXM, H100_PCIE, H100_NVL = "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"


def test_flops_per_token_formula():
    m = from_name("gpt3-1.3b")
    h, L, s, V = 2048, 24, 2048, 25600
    want = 6 * 12 * L * h * h + 6 * L * s * h + 6 * h * V
    assert flops_per_token(m, V, s) == want
    # 6N is the familiar approximation: within 15% here (attention adds ~8%).
    assert math.isclose(flops_per_token(m, V, s), 6 * 1.265e9, rel_tol=0.15)


def test_h100_variants_have_their_own_peaks():
    # A substring match on "H100" gave the PCIe and NVL cards the SXM peak.
    sxm, pcie, nvl = (peak_tflops(n, "bf16", tf32=True) for n in (H100_SXM, H100_PCIE, H100_NVL))
    assert sxm == 989.0
    assert pcie < nvl < sxm
    assert peak_tflops("NVIDIA H200 NVL", "bf16", tf32=True) < peak_tflops(
        "NVIDIA H200", "bf16", tf32=True
    )


def test_names_match_exactly_after_normalising_case_and_spaces():
    assert peak_tflops("  nvidia h100   pcie ", "bf16", tf32=True) == peak_tflops(
        H100_PCIE, "bf16", tf32=True
    )
    # "NVIDIA A10" is a prefix of every A100 name: it must not answer for an unknown A100-ish
    # card, nor an H100 row for a name that only contains "H100".
    assert peak_tflops("NVIDIA A100X", "bf16", tf32=True) is None
    assert peak_tflops("NVIDIA H100 80GB HBM3 (engineering sample)", "bf16", tf32=True) is None
    assert peak_tflops("NVIDIA A10", "bf16", tf32=True) == 125.0


def test_fp32_peak_follows_tf32():
    assert peak_tflops(H100_SXM, "fp32", tf32=True) == 494.5  # TF32 tensor cores
    assert peak_tflops(H100_SXM, "fp32", tf32=False) == 67.0  # IEEE fp32, CUDA cores
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=False) == 19.5
    # V100 has no TF32 units: fp32 matmuls run on CUDA cores whatever the flag says.
    assert peak_tflops("Tesla V100-SXM2-32GB", "fp32", tf32=True) == 15.7
    # bf16/fp16 do not depend on the flag.
    assert peak_tflops(H100_SXM, "bf16", tf32=False) == peak_tflops(H100_SXM, "bf16", tf32=True)


def test_override_unknown_device_and_missing_bf16():
    assert peak_tflops("Some Future GPU", "bf16", tf32=True) is None
    assert peak_tflops("Some Future GPU", "bf16", tf32=True, override=123.0) == 123.0
    assert peak_tflops(H100_SXM, "fp32", tf32=False, override=500.0) == 500.0
    assert peak_tflops(None, "bf16", tf32=True) is None
    assert peak_tflops("Tesla V100-PCIE-16GB", "bf16", tf32=True) is None  # emulated bf16
    assert peak_tflops("Tesla V100-PCIE-16GB", "fp16", tf32=True) == 112.0
    with pytest.raises(ValueError, match="train.precision"):
        peak_tflops(H100_SXM, "fp8", tf32=True)


def test_unknown_gpu_is_reported_once_with_what_to_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA B300 Imaginary")
    monkeypatch.setattr(metrics, "_WARNED", set())
    lines: list[str] = []
    gpu = torch.device("cuda", 0)
    assert device_peak_tflops(gpu, "bf16", log=lines.append) is None
    assert device_peak_tflops(gpu, "bf16", log=lines.append) is None
    assert len(lines) == 1 and "logging.peak_tflops" in lines[0] and "B300" in lines[0]
    assert device_peak_tflops(gpu, "bf16", 700.0, log=lines.append) == 700.0
    assert device_peak_tflops(torch.device("cpu"), "bf16", log=lines.append) is None
    assert len(lines) == 1  # CPU: no MFU and nothing to say


def test_tf32_decision_and_flags():
    assert uses_tf32("cuda", True) and not uses_tf32("cuda", False)
    assert not uses_tf32("cpu", True)
    # The flags themselves can be set without a GPU; restore them afterwards. By hand, not
    # with monkeypatch: cuda.matmul's flags live behind __getattr__, and pytest >= 9.2's
    # monkeypatch takes them for absent attributes and deletes them at teardown.
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert configure_matmul_precision(torch.device("cuda", 0), True) is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert configure_matmul_precision(torch.device("cuda", 0), False) is False
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
    assert Config().train.tf32 is True


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_counts_only_resumed_time():
    clock = FakeClock()
    w = ThroughputWindow(clock)
    w.resume()
    clock.now += 2.0
    w.pause(tokens=100)
    clock.now += 50.0  # evaluation / checkpoint between steps
    w.resume()
    clock.now += 3.0
    w.pause(tokens=200)
    assert w.take() == (300, 5.0)
    clock.now += 7.0
    w.resume()
    clock.now += 1.0
    w.pause(tokens=10)
    assert w.take() == (10, 1.0)  # the next window starts empty


def test_window_misuse_is_an_error():
    w = ThroughputWindow(FakeClock())
    with pytest.raises(RuntimeError):
        w.pause(tokens=1)
    w.resume()
    with pytest.raises(RuntimeError):
        w.resume()
    with pytest.raises(RuntimeError):
        w.take()


def test_trainer_run_leaves_eval_and_save_out_of_tokens_per_s(monkeypatch):
    """Trainer.run with stubbed engine, data and sinks on a fake clock: every step takes 1.5 s
    (0.5 s batch assembly + 1 s step), evaluation 50 s, a save 100 s. tokens/s must be
    tokens / 1.5 s per step, whatever eval and save cost."""
    from megagpt.training import trainer as trainer_mod

    clock = FakeClock()
    fake_time = types.SimpleNamespace(perf_counter=clock, time=clock, sleep=lambda s: None)
    monkeypatch.setattr(metrics, "time", fake_time)
    monkeypatch.setattr(trainer_mod, "time", fake_time, raising=False)  # the pre-fix timing

    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads = 2, 64, 4
    cfg.model.seq_length = 32
    cfg.train.precision, cfg.train.steps, cfg.train.global_batch_size = "fp32", 4, 8
    cfg.train.micro_batch_size, cfg.train.log_interval, cfg.train.eval_interval = 8, 2, 1
    cfg.checkpoint.interval = 1
    cfg.logging.peak_tflops = 1.0  # MFU reported: its denominator must be the same windows

    records: list[dict] = []
    tr = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    tr.cfg, tr.state, tr.device = cfg, trainer_mod.TrainState(), torch.device("cpu")
    tr.dims = types.SimpleNamespace(dp=1, world=1, tp=1, pp=1)
    tr.padded_vocab, tr.train_ds, tr.valid_ds = 25600, object(), object()
    tr.stop = types.SimpleNamespace(any_rank=lambda device: False, release=lambda: None)
    tr.metrics = types.SimpleNamespace(
        log=records.append, close=lambda: None, truncate_after=lambda step: None
    )

    def advance(seconds, value=None):
        def f(*args, **kwargs):
            clock.now += seconds
            return value

        return f

    tr._micro_batches = advance(0.5, [{}])
    tr.engine = types.SimpleNamespace(
        set_global_batch=lambda gb: None,
        set_lr=lambda lr: None,
        weights_finite=lambda: True,
        train_step=advance(
            1.0, {"loss": 5.0, "skipped": False, "grad_norm": 1.0, "loss_scale": 1.0}
        ),
    )
    tr.evaluate, tr.save, tr.export_model = advance(50.0), advance(100.0), advance(0.0)
    tr.run_dir = "unused"
    monkeypatch.setattr(trainer_mod, "log0", lambda msg: None)

    tr.run()
    logged = [r for r in records if "tokens_per_s" in r]
    assert [r["step"] for r in logged] == [2, 4]
    tokens_per_step = 8 * 32
    for r in logged:
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step / 1.5)
        want_tflops = metrics.flops_per_token(cfg.model, 25600, 32) * r["tokens_per_s"] / 1e12
        assert r["mfu"] == pytest.approx(want_tflops / 1.0)
