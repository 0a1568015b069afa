"""The planner's memory model against measured peak resident memory of real CPU training
(one process, fp32, ZeRO 1) of a small GPT; figures recorded in BENCHMARKS-planner.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT, launcher_env, tiny_recipe

# gpt3-tiny widened so that model state and activations dominate the process's own noise.
PROBE = ["model.hidden_size=512", "model.ffn_hidden_size=2048", "model.num_heads=8",
         "model.seq_length=64", "model.max_position_embeddings=64", "train.steps=2",
         "train.global_batch_size={mb}", "train.micro_batch_size={mb}", "checkpoint.interval=0"]


def _probe(recipe, run_dir, micro: int) -> dict:
    args = [a.format(mb=micro) for a in PROBE] + [f"run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "megagpt.planner.probe", "--config",
                           str(recipe), *args], env=launcher_env(PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][6:])


@pytest.mark.slow
def test_memory_model_tracks_measured_cpu_peaks(tiny_corpus, tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_corpus, tmp_path / "unused")
    small = _probe(recipe, tmp_path / "mb8", 8)
    large = _probe(recipe, tmp_path / "mb16", 16)
    for r in (small, large):
        print(f"memory probe {r['layout']}: measured {r['measured_bytes'] / 2**20:.0f} MiB, "
              f"predicted {r['predicted_bytes'] / 2**20:.0f} MiB, ratio {r['ratio']:.2f}")
    # Activations + logits: the growth from micro-batch 8 to 16 is predicted within 35 % (two
    # runs measured 56 and 67 MiB for a predicted 73 MiB; RSS on a loaded box is noisy).
    grown = large["measured_bytes"] - small["measured_bytes"]
    predicted = (large["predicted"]["activations"] + large["predicted"]["logits"]
                 - small["predicted"]["activations"] - small["predicted"]["logits"])
    assert grown == pytest.approx(predicted, rel=0.35)
    # In total the model is an underestimate on CPU: DeepSpeed's ZeRO flat buffers and
    # AdamW's unfused foreach temporaries add ~20 B/parameter it does not itemise
    # (BENCHMARKS-planner.md). Guard the recorded band so a regression shows.
    for r in (small, large):
        assert 0.45 <= r["ratio"] <= 1.05, r
