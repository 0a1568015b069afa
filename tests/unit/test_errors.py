"""One base for every user-facing error, and the CLI's one-line report of any of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megagpt.checkpoint.canonical import CheckpointError
from megagpt.checkpoint.model_dir import ModelDirError
from megagpt.config import ConfigError
from megagpt.data import BadRecordError, DataError
from megagpt.errors import MegagptError, TrainingError


@pytest.mark.parametrize(
    "cls", [ConfigError, DataError, BadRecordError, CheckpointError, ModelDirError, TrainingError]
)
def test_every_user_error_is_a_megagpt_error(cls):
    assert issubclass(cls, MegagptError)


def test_value_error_callers_still_catch_them():
    """ConfigError and CheckpointError were ValueErrors; code catching that keeps working."""
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, ValueError)


def test_cli_reports_a_checkpoint_error_in_one_line(tmp_path):
    """`megagpt convert` on a folder that is no checkpoint: CheckpointError, which the CLI
    used to let through as a traceback."""
    (tmp_path / "junk.txt").write_text("x")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.cli",
            "convert",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            "--to",
            "hf",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megagpt convert: error: "), proc.stderr
    assert "not a checkpoint megagpt knows" in lines[0]


def test_training_error_exits_3(monkeypatch, capsys):
    """A run stopped because it cannot go on safely exits 3 (not 2, a bad config)."""
    from megagpt import cli

    def stop(args):
        raise TrainingError("stopping at step 4: 2 consecutive bad steps\nsecond line")

    monkeypatch.setattr(cli, "cmd_models", stop)
    assert cli.main(["models"]) == 3
    err = capsys.readouterr().err
    assert err == (
        "megagpt models: error: stopping at step 4: 2 consecutive bad steps second line\n"
    )
