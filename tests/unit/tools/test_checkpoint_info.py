"""tools/checkpoint_info.py on a real tiny training run (and its model directory), an offline
TP2 x PP2 record, a damaged checkpoint, and wrong paths. The real run also feeds `megagpt plot`
and shows that logging.tensorboard=true writes event files from the trainer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from megagpt.config.sizes import parameter_count
from tests.distributed.conftest import tiny_recipe
from tests.unit.tools.conftest import ROOT, load_tool, run_script

STEPS, GB, SEQ = 4, 8, 32  # tiny_recipe: global batch 8; gpt3-tiny: seq_length 32


@pytest.fixture(scope="module")
def tool():
    return load_tool("checkpoint_info")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, jieba_tokenizer, wiki_texts):
    """A real 4-step gpt3-tiny run (one CPU process, `megagpt train`) checkpointed at 2 and 4."""
    from megagpt.data import make_input_spec, preprocess

    root = tmp_path_factory.mktemp("ckpt")
    src = root / "wiki.jsonl"
    src.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in wiki_texts),
        encoding="utf-8",
    )
    preprocess(
        [make_input_spec(str(src))],
        str(jieba_tokenizer),
        str(root / "wiki"),
        append_eod=True,
        progress=False,
    )
    corpus = {"tokenizer": str(jieba_tokenizer), "prefix": str(root / "wiki")}
    recipe = tiny_recipe(root / "tiny.yaml", corpus, root / "run")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.cli",
            "train",
            "--config",
            str(recipe),
            f"train.steps={STEPS}",
            "checkpoint.interval=2",
            "checkpoint.keep_last=5",
            "model.vocab_size=800",
            "train.eval_interval=2",
            "logging.tensorboard=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "run"


@pytest.mark.slow  # the `trained` fixture trains for real (~1 min on 2 cores)
def test_training_checkpoint_from_run_dir_checkpoints_dir_and_step_folder(
    trained, tool, jieba_tokenizer
):
    from megagpt.checkpoint.reshard import read_meta

    infos = [
        tool.describe(str(p))
        for p in (trained, trained / "checkpoints", trained / "checkpoints" / "step_0000004")
    ]
    assert all(i["path"] == infos[0]["path"] for i in infos)
    info = infos[0]
    assert info["kind"] == "training" and info["tag"] == info["latest"] == "step_0000004"
    assert info["checkpoints"] == ["step_0000002", "step_0000004"]
    assert info["step"] == STEPS and info["consumed_samples"] == STEPS * GB
    assert info["tokens"] == STEPS * GB * SEQ
    meta = read_meta(info["path"])
    assert info["layout"] == meta["layout"] and info["layout"]["tp"] == 1
    assert info["layout"]["precision"] == "fp32" and info["adam_step"] == STEPS
    cfg = info["model"]["config"]
    assert cfg["name"] == "gpt3-tiny" and cfg["vocab_size"] == 800
    from megagpt.config.schema import ModelConfig

    n = parameter_count(ModelConfig(**cfg))
    assert info["model"]["parameters"] == n
    # the stored fp32 master holds the vocabulary padded for TP (800 -> a multiple of 128)
    t = info["tensors"]
    assert t["dtypes"].keys() == {"F32"} and t["elements"] == n + (896 - 800) * cfg["hidden_size"]
    assert info["optimizer_state"] == ["exp_avg", "exp_avg_sq"]
    assert info["tokenizer"]["path"] == str(jieba_tokenizer)
    assert info["tokenizer"]["family"] == "jieba-bpe" and info["tokenizer"]["vocab_size"] == 800
    manifest = json.loads((trained / "checkpoints" / "step_0000004" / "manifest.json").read_text())
    listed = {f["path"]: f for f in info["files"]}
    for rel, entry in manifest["files"].items():
        assert listed[rel]["size"] == entry["size"] and listed[rel]["crc32"] == entry["crc32"]
    older = tool.describe(str(trained / "checkpoints" / "step_0000002"))
    assert older["step"] == 2 and older["tag"] != older["latest"]


@pytest.mark.slow  # the `trained` fixture trains for real (~1 min on 2 cores)
def test_model_directory(trained, tool):
    info = tool.describe(str(trained / "model"))
    assert info["kind"] == "model" and info["trained_steps"] == STEPS
    assert info["trained_tokens"] == STEPS * GB * SEQ
    n = info["model"]["parameters"]
    assert info["tensors"]["elements"] == n and info["tensors"]["dtypes"].keys() == {"F32"}
    assert info["tokenizer"]["family"] == "jieba-bpe"
    assert info["tokenizer"]["path"] == str(trained / "model" / "tokenizer")


@pytest.mark.slow  # the `trained` fixture trains for real (~1 min on 2 cores)
def test_script_report_verify_and_damage(trained, tmp_path):
    out = run_script("checkpoint_info", str(trained), "--verify")
    assert out.returncode == 0, out.stderr
    assert "step            4" in out.stdout and "TP 1 x PP 1 x DP 1, ZeRO 1, fp32" in out.stdout
    assert "OK: every file matches" in out.stdout
    assert "gpt3-tiny: 4 layers, hidden 64" in out.stdout
    out = run_script("checkpoint_info", str(trained / "model"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["kind"] == "model"
    # Flip one byte of the weights of a copy: --verify names the file, exit status 1.
    copy = tmp_path / "checkpoints"
    shutil.copytree(trained / "checkpoints", copy)
    param = copy / "step_0000004" / "layout_free" / "tp00-pp00.param.safetensors"
    data = bytearray(param.read_bytes())
    data[-5] ^= 0xFF
    param.write_bytes(bytes(data))
    out = run_script("checkpoint_info", str(copy), "--verify")
    assert out.returncode == 1 and "FAILED" in out.stdout
    assert f"{param}: checksum" in out.stdout
    # A truncated weight file (its header no longer readable) is named, not a traceback, with
    # or without --verify, in a checkpoint and in a model directory.
    param.write_bytes(bytes(data[: len(data) // 2]))
    for args in ([str(copy)], [str(copy), "--verify"]):
        out = run_script("checkpoint_info", *args)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "1 weight file(s) unreadable" in out.stdout and f"    {param}: " in out.stdout
    assert "FAILED" in out.stdout  # --verify: the manifest's check fails as well
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    weights = sorted(model.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:100])
    out = run_script("checkpoint_info", str(model))
    assert out.returncode == 1 and f"    {weights}: " in out.stdout, out.stderr


def test_offline_tp2_pp2_record_without_manifest(tmp_path, tool):
    from megagpt.checkpoint import reshard
    from tests.unit.checkpoint.conftest import random_state, small_config

    cfg = small_config(num_layers=4)
    folder = tmp_path / "step_0000100"
    reshard.write_record(
        str(folder),
        {"param": random_state(cfg)},
        cfg,
        tp=2,
        pp=2,
        client={"step": 100, "consumed_samples": 1600},
    )
    info = tool.describe(str(folder))
    assert info["step"] == 100 and info["tokens"] == 1600 * cfg.seq_length
    assert (info["layout"]["tp"], info["layout"]["pp"]) == (2, 2)
    assert info["tensors"]["files"] == 4 and info["optimizer_state"] == []
    assert info["manifest"] is None and info["tokenizer"] is None and info["latest"] is None
    text = tool.render(info)
    assert "no manifest" in text and "none (weights only)" in text


def test_wrong_paths_are_clear_errors(tmp_path, tool, capsys):
    assert tool.main([str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert tool.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint megagpt knows" in err and "Traceback" not in err
    out = run_script("checkpoint_info", "--help")
    assert out.returncode == 0 and "--verify" in out.stdout


@pytest.mark.slow  # the `trained` fixture trains for real (~1 min on 2 cores)
def test_plot_and_tensorboard_of_the_real_run(trained, tmp_path):
    pytest.importorskip("matplotlib")
    from megagpt.training.plots import PANELS, plot_runs

    fig = plot_runs([str(trained)], str(tmp_path / "run.png"))
    axes = fig.get_axes()
    assert len(axes) == 2 * len(PANELS)
    assert [ln.get_label() for ln in axes[0].get_lines()] == ["run", "run (valid)"]
    assert list(axes[1].get_lines()[0].get_xdata()) == [s * GB * SEQ for s in range(1, 5)]
    assert (tmp_path / "run.png").stat().st_size > 10_000
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
