"""Checkpoint tags and the ``latest`` file (``megagpt.checkpoint.tags``): naming, parsing, the
atomic pointer, and that the module stays importable without torch."""

from __future__ import annotations

import subprocess
import sys

from megagpt.checkpoint.tags import (
    checkpoint_dir,
    is_tag,
    latest_step,
    order,
    read_latest,
    step_of,
    tag_for,
    write_latest,
)


def test_tags_order_by_step_past_seven_digits():
    """A string sort puts step_10000000 before step_9999999; pruning and the fall-back to an
    older checkpoint order by step."""
    assert tag_for(100) == "step_0000100"
    assert tag_for(12_345_678) == "step_12345678"
    tags = [tag_for(s) for s in (9, 10, 100, 9_999_999, 10_000_000)]
    assert sorted(reversed(tags), key=order) == tags


def test_is_tag_accepts_only_folders_megagpt_writes():
    assert is_tag("step_0000100") and is_tag("step_12345678")
    for name in ("step_100", "step_0000100.damaged", "latest", "latest.tmp", "step_abcdefg"):
        assert not is_tag(name), name


def test_step_of_parses_any_step_tag():
    assert step_of("step_0000100") == 100
    assert step_of("step_7\n") == 7  # hand-written: still a step
    assert step_of("checkpoint-7") is None and step_of("") is None


def test_latest_round_trip_and_missing(tmp_path):
    assert read_latest(tmp_path) is None and latest_step(tmp_path) == 0
    write_latest(tmp_path, "step_0000042")
    assert (tmp_path / "latest").read_text() == "step_0000042\n"
    assert read_latest(tmp_path) == "step_0000042" and latest_step(tmp_path) == 42
    assert not (tmp_path / "latest.tmp").exists()
    write_latest(tmp_path, "step_0000043")  # replaces, never appends
    assert read_latest(tmp_path) == "step_0000043"


def test_empty_or_foreign_latest_reads_as_no_step(tmp_path):
    (tmp_path / "latest").write_text("\n")
    assert read_latest(tmp_path) is None and latest_step(tmp_path) == 0
    (tmp_path / "latest").write_text("global_step7\n")  # e.g. DeepSpeed's own naming
    assert read_latest(tmp_path) == "global_step7" and latest_step(tmp_path) == 0


def test_checkpoint_dir_is_under_the_run_dir():
    assert checkpoint_dir("runs/a") == "runs/a/checkpoints"


def test_tags_import_without_torch():
    """Slurm's requeue check (megagpt.planner.run_state) imports this at every job start."""
    code = (
        "import sys\nimport megagpt.checkpoint.tags\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_commit_and_resume_order_by_step_past_seven_digits(tmp_path):
    """Committing step 10,000,000 keeps the newest ``keep_last`` by step; a string order took
    step_9999999 for a newer, uncommitted leftover and deleted it."""
    from megagpt.checkpoint.manager import commit, resume_tag

    def save(step):
        (tmp_path / tag_for(step)).mkdir()
        (tmp_path / tag_for(step) / "f.bin").write_bytes(b"x")

    save(9_999_998)
    save(9_999_999)
    commit(str(tmp_path), tag_for(9_999_999), keep_last=5)
    save(10_000_000)
    commit(str(tmp_path), tag_for(10_000_000), keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir() if is_tag(p.name))
    assert left == [tag_for(10_000_000), tag_for(9_999_999)]
    # The newest damaged: the fall-back is the step before it, not a string-order neighbour.
    (tmp_path / tag_for(10_000_000) / "f.bin").write_bytes(b"changed")
    assert resume_tag(str(tmp_path), log=lambda msg: None) == tag_for(9_999_999)
