"""`megagpt convert` never destroys what it reads nor, unasked, what it would replace: an output
that is (or lies inside) the input is refused however it is spelt, a non-empty output needs
--overwrite, and an overwrite that fails leaves the old output as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megagpt.checkpoint import convert, hf, model_dir
from megagpt.checkpoint.canonical import CheckpointError
from megagpt.cli import main


@pytest.fixture
def model(tmp_path, cfg, state) -> Path:
    """A megagpt model directory of the small config."""
    out = tmp_path / "model"
    model_dir.save_tensors(str(out), state)
    model_dir.write_config(str(out), cfg)
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes): the whole of what a user has."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run_convert(*args: str) -> int:
    return main(["convert", *args])


@pytest.mark.parametrize("spelling", ["same", "relative", "trailing-dot", "symlink", "inside"])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(
    tmp_path, model, state, spelling, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(model, target_is_directory=True)
    output = {
        "same": str(model),
        "relative": "model",
        "trailing-dot": "./sub/../model/.",
        "symlink": str(tmp_path / "link"),
        "inside": str(model / "hf"),
    }[spelling]
    before = snapshot(model)
    assert run_convert("--input", str(model), "--output", output, "--to", "hf") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megagpt convert: error: --output"), err
    assert "--input" in err[0]
    assert snapshot(model) == before
    assert convert.detect(str(model)) == "megagpt"  # `megagpt generate --model` still reads it
    got = model_dir.load_tensors(str(model))
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # --overwrite does not make it allowed
    assert run_convert("--input", str(model), "--output", output, "--to", "hf", "--overwrite") == 2
    assert snapshot(model) == before


def test_an_input_inside_the_output_is_refused(tmp_path, model, capsys):
    before = snapshot(model)
    rc = run_convert("--input", str(model), "--output", str(tmp_path), "--to", "hf", "--overwrite")
    assert rc == 2 and "--output" in capsys.readouterr().err
    assert snapshot(model) == before


def test_a_non_empty_output_needs_overwrite(tmp_path, model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_convert("--input", str(model), "--output", str(out), "--to", "hf") == 2
    err = capsys.readouterr().err
    assert f"--output {out}" in err and "pass --overwrite to replace it" in err
    assert snapshot(out) == {"notes.txt": b"mine"}  # nothing written, nothing lost

    assert (
        run_convert("--input", str(model), "--output", str(out), "--to", "hf", "--overwrite") == 0
    )
    assert not (out / "notes.txt").exists()  # replaced, not merged
    assert convert.detect(str(out)) == "hf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # no temporary left

    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory holds nothing to lose
    assert run_convert("--input", str(model), "--output", str(empty), "--to", "megagpt") == 0
    assert convert.detect(str(empty)) == "megagpt"


def test_overwriting_through_a_symlink_fills_its_target(tmp_path, model):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    rc = run_convert(
        "--input", str(model), "--output", str(tmp_path / "link"), "--to", "hf", "--overwrite"
    )
    assert rc == 0
    assert (tmp_path / "link").is_symlink() and convert.detect(str(real)) == "hf"
    assert not (real / "old.txt").exists()


def test_a_failed_overwrite_leaves_the_old_output(tmp_path, model, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_convert("--input", str(model), "--output", str(out), "--to", "hf") == 0
    before = snapshot(out)

    def half_written(directory, *args, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text("{")  # a crash in the middle of writing
        raise CheckpointError("disk full")

    monkeypatch.setattr(hf, "write", half_written)
    rc = run_convert("--input", str(model), "--output", str(out), "--to", "hf", "--overwrite")
    assert rc == 2 and "disk full" in capsys.readouterr().err
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]  # the half-written copy is gone
