"""GPU checks (marked `gpu`; skipped without CUDA): the same engine on CUDA/NCCL.

What they establish, and what bench/gpu_check.sh reports from them, is listed in docs/gpu.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
LOSSES = "tests.distributed.workers:engine_losses_on"
MEMORIZE = "tests.gpu.workers:memorize_losses"
BASE = ["train.global_batch_size=8", "train.micro_batch_size=2"]
# Per-step tolerance of bf16 on CUDA against fp32 on the CPU. The memorising run's loss falls by
# more than 1.3% of its value at every one of the 20 steps (6.95 -> 5.16), so 1e-2 is finer
# than one step of progress: a lost update or a wrong accumulation shows. bf16 itself moved the
# loss by at most 3.4e-4 relative from fp32 on the CPU (same run, CPU bf16), so 1e-2 leaves
# ~30x for the GPU's different kernels (flash attention, cuBLAS split-K).
BF16_REL = 1e-2


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_cuda_bf16_losses_track_cpu_fp32_for_20_steps():
    cpu = run_distributed(MEMORIZE, 1, precision="fp32", device="cpu")[0]["losses"]
    gpu = run_distributed(MEMORIZE, 1, precision="bf16", device="cuda")[0]["losses"]
    assert len(cpu) == len(gpu) == 20
    assert cpu[-1] < cpu[0] - 1.0, f"the fp32 run did not learn: {cpu}"
    bad = [(i, c, g) for i, (c, g) in enumerate(zip(cpu, gpu)) if abs(g - c) > BF16_REL * c]
    assert not bad, (
        f"steps where CUDA bf16 left fp32 by > {BF16_REL:.0%} (step, fp32, bf16): "
        f"{bad}\nfp32: {cpu}\nbf16: {gpu}"
    )


def test_attention_runs_flash_in_bf16():
    """megagpt's attention call is flash-compatible (it runs with SDPA restricted to the flash
    kernel alone), and the default dispatch picks a fused kernel: flash (or cuDNN's fused
    attention, which newer PyTorch may prefer on Hopper), never the math kernel, which
    materialises the s x s scores the planner assumes are never stored."""
    r = run_distributed("tests.gpu.workers:attention_kernels", 1, device="cuda")[0]
    assert r["flash_only"] == "ok", f"on {r['device']}: {r['flash_only']}"
    ops = r["ops"]
    fused = [n for n in ops if "flash_attention" in n or "cudnn_attention" in n]
    assert fused, f"no flash/cuDNN attention op on {r['device']}; ops: {ops}"
    assert not any("attention_math" in n for n in ops), f"math attention ran: {ops}"


def short_train(tmp_path: Path, overrides: list[str]) -> tuple[list[dict], str]:
    """`megagpt train` of the quickstart recipe on the bundled sample corpus for 20 steps, in
    a fresh process; returns the training records of metrics.jsonl and the log."""
    from megagpt.quickstart import prepare

    tok, prefix, run = tmp_path / "tok", tmp_path / "data" / "sample", tmp_path / "run"
    prepare(str(tok), str(prefix))
    cmd = [
        sys.executable,
        "-m",
        "megagpt.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "pretrain" / "tiny.yaml"),
        f"data.paths=[{prefix}]",
        f"data.tokenizer={tok}",
        f"run.dir={run}",
        "train.steps=20",
        "train.log_interval=5",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "logging.wandb=disabled",
        *overrides,
    ]
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    records = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    return [r for r in records if "tokens_per_s" in r], log


def test_megagpt_train_on_cuda_reports_mfu(tmp_path):
    """A short `megagpt train` in bf16 on CUDA logs MFU: every training record of
    metrics.jsonl has an "mfu" in (0, 1) (so this GPU's peak is known), and the log prints it."""
    records, log = short_train(tmp_path, ["train.device=cuda", "train.precision=bf16"])
    mfu = [r["mfu"] for r in records]
    assert len(mfu) == 4, records
    assert all(m is not None and 0 < m < 1 for m in mfu), (
        f"MFU not reported on {torch.cuda.get_device_name()}: {mfu}\n{log[-2000:]}"
    )
    assert "MFU" in log
    print(f"MFU of gpt3-mini bf16 on {torch.cuda.get_device_name()}: {mfu}")


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(
    "extra",
    [
        ["parallel.tensor=2"],
        ["parallel.tensor=2", "parallel.sequence_parallel=true"],
        ["parallel.pipeline=2"],
    ],
)
def test_nccl_layouts_match_single_gpu(extra):
    one = run_distributed(LOSSES, 1, overrides=BASE, steps=3, device="cuda")[0]
    two = run_distributed(LOSSES, 2, overrides=BASE + extra, steps=3, device="cuda")[0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_serving_on_cuda_decodes_with_the_fast_path_and_speculates(tmp_path_factory, dtype):
    """The serving engine on CUDA: the fast path (no oneDNN packs there), greedy rows checking
    n-gram guesses (``FastDecoder.verify``) next to one-token rows, continuous batching through
    4 rows; the tokens equal one-at-a-time greedy decoding without speculation on the same
    device (the generation tests' model: its greedy margins are wide, so bf16's rounding does
    not flip a choice)."""
    from megagpt import pipeline
    from tests.unit.inference.conftest import shared_assets
    from tests.unit.inference.test_decode_loop import twin
    from tests.unit.serving.test_engine import GREEDY, _run_engine

    model = shared_assets(tmp_path_factory)["model"]
    pipe = pipeline("text-generation", model=model, device="cuda", dtype=dtype)
    gen = pipe.generator
    prompts = [
        "床前明月光床前明月光",
        "北京北京北京",
        "上海的天气",
        "山山山山",
        "春眠不觉晓",
        "长江",
    ]
    got, engine = _run_engine(gen, pipe.tokenizer, [(p, 24, GREEDY, None) for p in prompts])
    assert engine.executor.decoder is not None and engine.spec_stats["checks"] > 0
    plain = twin(gen, speculate=0)
    for prompt, tokens in zip(prompts, got):
        ids = pipe.tokenizer.encode(prompt)
        (want,) = plain.generate([ids], GREEDY, max_new_tokens=24)[0]
        assert tokens == want[len(ids) :], (prompt, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_decode_step_on_cuda_gives_the_eager_tokens(tmp_path_factory, dtype):
    """`megagpt generate --compile` on CUDA: the static step under torch.compile with CUDA
    graphs (mode reduce-overhead) decodes the eager fast path's greedy tokens, at batch 1 and
    2 (one graph per batch size), for the generation tests' model (wide greedy margins)."""
    from megagpt import pipeline
    from tests.unit.inference.conftest import shared_assets
    from tests.unit.inference.test_decode_loop import twin
    from tests.unit.serving.test_engine import GREEDY

    model = shared_assets(tmp_path_factory)["model"]
    pipe = pipeline("text-generation", model=model, device="cuda", dtype=dtype)
    gen = pipe.generator
    compiled = twin(gen, compile=True)
    assert compiled.static and compiled.compile
    ids = [pipe.tokenizer.encode(p) for p in ("床前明月光", "北京北京")]
    try:
        for batch in ([ids[0]], ids):
            want = gen.generate(batch, GREEDY, max_new_tokens=16)
            assert compiled.generate(batch, GREEDY, max_new_tokens=16) == want, (batch, dtype)
    finally:
        torch._dynamo.reset()
    assert compiled._compiled is not None
