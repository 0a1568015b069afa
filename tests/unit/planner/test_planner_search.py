"""Step-time model, layout search and the `plan` command."""

from __future__ import annotations

import pytest

from megagpt.cli import main
from megagpt.config import load_config
from megagpt.planner.hardware import ClusterShape, gpu_type
from megagpt.planner.memory import Layout
from megagpt.planner.search import evaluate, search
from megagpt.planner.timing import step_time
from megagpt.planner.write import parse_plan_header

H100 = gpu_type("h100-80gb")


def cfg_175b():
    return load_config(None, ["model.name=gpt3-175b"])


# gpt3-1.3b by hand: h = 2048, 24 layers, FFN 8192, sequence 2048, vocabulary 25,600 (already
# a multiple of 128, so unpadded at TP 1). Training FLOPs per token are 3 x the forward's (the
# backward costs twice the forward): a layer's forward is 2 x (4h^2 QKV + out, 2*ffn*h MLP)
# for the weights plus 2*s*h for the causal attention scores and values; the head's is 2*h*V.
H, S, FFN, VOCAB = 2048, 2048, 8192, 25_600
LAYER_FPT = 3 * (2 * (4 * H * H + 2 * FFN * H) + 2 * S * H)  # 327,155,712
HEAD_FPT = 3 * 2 * H * VOCAB  # 314,572,800
RATE_HALF = 989.0e12 * 0.5  # H100 dense bf16 peak x efficiency 0.5


def test_pipeline_bubble_and_compute_by_hand():
    # One stage per node, no TP: the bubble is (PP-1) slots of the slowest stage.
    cfg = load_config(None, ["model.name=gpt3-1.3b"])
    m = cfg.model
    sizes = (m.hidden_size, m.seq_length, m.ffn, m.vocab_size, m.num_layers)
    assert sizes == (H, S, FFN, VOCAB, 24)
    shape = ClusterShape(4, 1, H100)
    lay = Layout(tp=1, pp=4, dp=1, micro_batch=1)
    t = step_time(cfg.model, lay, shape, precision="bf16", global_batch=8, efficiency=0.5)
    # The last stage is the slowest: 6 layers plus the output layer, 8 micro-batches of S tokens.
    assert t.compute_s == pytest.approx(8 * (6 * LAYER_FPT + HEAD_FPT) * S / RATE_HALF)
    slot = (t.compute_s + t.tp_comm_s + t.pp_comm_s) / 8
    assert t.bubble_s == pytest.approx(3 * slot)
    assert t.step_s == pytest.approx(11 * slot)  # (8 micro-batches + 3) slots, DP=1
    assert t.dp_comm_s == 0 and t.tp_comm_s == 0
    assert t.mfu < 0.5  # never above the stated efficiency


def test_recompute_adds_the_forward_it_repeats():
    """Full recompute runs each layer's forward twice: 4/3 of the layers' training FLOPs (the
    head is not recomputed); selective recomputes only the attention scores' forward, 2*s*h per
    token and layer."""
    cfg = load_config(None, ["model.name=gpt3-1.3b"])
    shape = ClusterShape(1, 1, H100)

    def compute(recompute):
        lay = Layout(tp=1, pp=1, dp=1, micro_batch=1, recompute=recompute)
        t = step_time(cfg.model, lay, shape, precision="bf16", global_batch=4, efficiency=0.5)
        return t.compute_s

    tokens = 4 * S  # 4 micro-batches of one sequence
    head_s = HEAD_FPT * tokens / RATE_HALF
    layers_s = 24 * LAYER_FPT * tokens / RATE_HALF
    assert compute("none") == pytest.approx(layers_s + head_s)
    assert compute("full") == pytest.approx(layers_s * 4 / 3 + head_s)
    assert compute("selective") == pytest.approx(
        layers_s + 24 * 2 * S * H * tokens / RATE_HALF + head_s
    )
    assert compute("none") < compute("selective") < compute("full")


def test_tensor_parallel_across_nodes_is_slower_than_within():
    cfg = cfg_175b()
    lay = Layout(tp=8, pp=8, dp=16, micro_batch=1)
    inside = step_time(
        cfg.model, lay, ClusterShape(128, 8, H100), precision="bf16", global_batch=3072
    )
    across = step_time(
        cfg.model, lay, ClusterShape(256, 4, H100), precision="bf16", global_batch=3072
    )
    assert across.tp_comm_s > 5 * inside.tp_comm_s


def test_175b_on_1024_h100_is_in_the_published_range():
    # Megatron-LM reports 42-47 % MFU for GPT-3 175B-class models on H100 (field survey P3).
    plans, _ = search(cfg_175b(), ClusterShape(128, 8, H100))
    best = plans[0]
    assert 0.35 < best.time.mfu < 0.55
    assert best.peak.total < 0.9 * 79.6 * 2**30
    assert all(p.time.step_s >= best.time.step_s for p in plans)


def test_too_small_cluster_is_rejected_naming_flags():
    with pytest.raises(ValueError, match="--nodes 1"):
        search(cfg_175b(), ClusterShape(1, 8, gpu_type("a100-40gb")))


def test_layout_that_does_not_fit_names_the_stage():
    plan = evaluate(
        cfg_175b(),
        Layout(tp=8, pp=1, dp=128, micro_batch=1, zero_stage=1),
        ClusterShape(128, 8, H100),
    )
    assert not plan.fits and "GiB on stage 0" in plan.problems[0]


def test_invalid_layout_reports_megagpt_validation():
    plan = evaluate(
        cfg_175b(),
        Layout(tp=8, pp=8, dp=16, micro_batch=1, zero_stage=2),
        ClusterShape(128, 8, H100),
    )
    assert not plan.fits and "zero_stage" in plan.problems[0]


def test_plan_command_prints_best_and_assumptions(capsys):
    assert (
        main(["plan", "--model", "gpt3-175b", "--nodes", "128", "--gpu", "h100-80gb", "--top", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert "layouts fit" in out and "MFU" in out and "assumptions:" in out
    assert "Korthikanti" in out and "989" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "gpt3-13b", "--nodes", "2", "--gpu", "b300"], "--gpu 'b300'"),
        (["--model", "gpt3-13b", "--nodes", "0"], "--nodes must be >= 1"),
        (["--model", "gpt3-13b", "--nodes", "2", "--gpus-per-node", "0"], "--gpus-per-node"),
        (["--model", "gpt3-99b", "--nodes", "2"], "unknown model size"),
        (["--model", "gpt3-175b", "--nodes", "1", "--gpu", "a100-40gb"], "no layout"),
        (["--model", "gpt3-13b", "--nodes", "2", "--efficiency", "1.5"], "--efficiency"),
        (["--model", "gpt3-13b", "--nodes", "2", "--top", "0"], "--top must be >= 1, got 0"),
        (["--model", "gpt3-13b", "--nodes", "2", "--sbatch-dir", "s"], "--sbatch-dir only"),
        (["--model", "gpt3-13b", "--nodes", "2", "--check", "--write", "w"], "leave out --check"),
    ],
)
def test_plan_errors_name_the_flag(argv, needle, capsys):
    assert main(["plan", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_plan_write_emits_a_loadable_pair(tmp_path, capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "gpt3-2.7b",
                "--nodes",
                "2",
                "--gpu",
                "a100-80gb",
                "--write",
                str(tmp_path),
            ]
        )
        == 0
    )
    cfg_path = tmp_path / "gpt3-2.7b_2x8-a100-80gb.yaml"
    sbatch = (tmp_path / "gpt3-2.7b_2x8-a100-80gb.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    assert "launch/slurm/train.sbatch" in sbatch and str(cfg_path) in sbatch
    header = parse_plan_header(cfg_path)
    assert header["nodes"] == "2" and header["gpu"] == "a100-80gb"
    cfg = load_config(cfg_path)
    assert cfg.train.global_batch_size * cfg.model.seq_length == 2 * 2**20
    assert (
        main(["plan", "--config", str(cfg_path), "--nodes", "2", "--gpu", "a100-80gb", "--check"])
        == 0
    )


@pytest.mark.parametrize("flag", ["--write", "--sbatch-dir"])
def test_plan_write_to_a_bad_folder_names_the_flag_before_the_search(tmp_path, flag, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    bad = str(blocker / "plans")
    dirs = {"--write": str(tmp_path / "w"), "--sbatch-dir": str(tmp_path / "s"), flag: bad}
    argv = ["plan", "--model", "gpt3-1.3b", "--nodes", "1", "--gpu", "a100-80gb"]
    argv += ["--write", dirs["--write"], "--sbatch-dir", dirs["--sbatch-dir"]]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert f"megagpt plan: error: {flag} {bad}: cannot create the folder" in err
    assert "layouts fit" not in out  # refused before the search and its printout
    assert not list(tmp_path.rglob("*.yaml")) and not list(tmp_path.rglob("*.sbatch"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no folder made either
