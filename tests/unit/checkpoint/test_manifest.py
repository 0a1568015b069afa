"""The checkpoint manifest (sizes + CRC-32) and the fall-back to the newest intact checkpoint,
with faults injected for real into files on disk (no process group: the single-process path;
the multi-rank one: tests/distributed/test_checkpoint_safety.py)."""

from __future__ import annotations

import json

import pytest

from megagpt.checkpoint import convert, manifest, model_dir, reshard
from megagpt.checkpoint.canonical import CheckpointError
from megagpt.checkpoint.manager import resume_tag, tag_for

PARAM = "layout_free/tp00-pp00.param.safetensors"
MOMENT = "layout_free/tp00-pp00.exp_avg_sq.safetensors"


def make_run(root, cfg, state, steps=(3, 6)):
    """A checkpoints dir with one record per step, each with its manifest, `latest` newest."""
    for step in steps:
        folder = root / tag_for(step)
        reshard.write_record(
            str(folder),
            {"param": state, "exp_avg": state, "exp_avg_sq": state},
            cfg,
            tp=1,
            pp=1,
            client={"step": step, "consumed_samples": 8 * step},
        )
        (folder / "rng").mkdir()
        (folder / "rng" / "pp000-tp000.pt").write_bytes(b"rng-bytes")
        manifest.write(str(folder))
    (root / "latest").write_text(tag_for(steps[-1]) + "\n")
    return root


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_size_and_crc(tmp_path, cfg, state):
    run = make_run(tmp_path, cfg, state, steps=(3,))
    m = json.loads((run / "step_0000003" / "manifest.json").read_text())
    assert m["checksum"] == "crc32"
    assert sorted(m["files"]) == sorted(
        ["layout_free/meta.json", "rng/pp000-tp000.pt"]
        + [f"layout_free/tp00-pp00.{k}.safetensors" for k in reshard.KINDS]
    )
    assert m["files"][PARAM]["size"] == (run / "step_0000003" / PARAM).stat().st_size
    assert manifest.verify(str(run / "step_0000003")) == []


FAULTS = {
    "truncated safetensors": (lambda f: truncate(f / PARAM), PARAM),
    "flipped byte (same size)": (lambda f: flip(f / MOMENT), MOMENT),
    "missing meta.json": (lambda f: (f / "layout_free/meta.json").unlink(), "meta.json"),
    "missing rng file": (lambda f: (f / "rng/pp000-tp000.pt").unlink(), "pp000-tp000.pt"),
    "file grown": (
        lambda f: (f / "rng/pp000-tp000.pt").write_bytes(b"rng-bytes++"),
        "pp000-tp000.pt",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_newest_falls_back_to_the_intact_one(tmp_path, cfg, state, fault):
    damage, name = FAULTS[fault]
    run = make_run(tmp_path, cfg, state)
    damage(run / "step_0000006")
    problems = manifest.verify(str(run / "step_0000006"))
    assert len(problems) == 1 and name in problems[0] and str(run) in problems[0]
    with pytest.raises(CheckpointError, match=name) as e:
        resume_tag(str(run), require_latest=True)
    assert "require_latest" in str(e.value)
    assert (run / "step_0000006").is_dir(), "require_latest must not touch the run"
    said = []
    assert resume_tag(str(run), log=said.append) == "step_0000003"
    assert name in said[0]
    assert (run / "latest").read_text().strip() == "step_0000003"
    assert (run / "step_0000006.damaged").is_dir() and not (run / "step_0000006").exists()
    assert resume_tag(str(run)) == "step_0000003"  # and stays there


def test_latest_naming_a_lost_folder_falls_back(tmp_path, cfg, state):
    run = make_run(tmp_path, cfg, state)
    (run / "latest").write_text("step_0000009\n")
    assert resume_tag(str(run), log=lambda _: None) == "step_0000006"
    with pytest.raises(CheckpointError, match="step_0000009 does not exist"):
        (run / "latest").write_text("step_0000009\n")
        resume_tag(str(run), require_latest=True)


def test_every_checkpoint_damaged_is_an_error_naming_each(tmp_path, cfg, state):
    run = make_run(tmp_path, cfg, state)
    truncate(run / "step_0000006" / PARAM)
    (run / "step_0000003" / "layout_free" / "meta.json").unlink()
    with pytest.raises(CheckpointError) as e:
        resume_tag(str(run), log=lambda _: None)
    assert "step_0000006" in str(e.value) and "step_0000003" in str(e.value)


def test_without_latest_the_newest_manifested_folder_counts(tmp_path, cfg, state):
    """A crash between the manifest and `latest` leaves a complete checkpoint; a folder without
    a manifest (a save that crashed earlier) is never resumed."""
    run = make_run(tmp_path, cfg, state)
    (run / "latest").unlink()
    (run / "step_0000009").mkdir()  # a save that crashed before its manifest
    assert resume_tag(str(run), log=lambda _: None) == "step_0000006"
    assert resume_tag(str(tmp_path / "nothing")) is None


def test_checkpoint_without_manifest_is_checked_for_structure(tmp_path, cfg, state):
    """Older checkpoints (no manifest) still resume; a truncated safetensors is still found."""
    run = make_run(tmp_path, cfg, state)
    (run / "step_0000006" / "manifest.json").unlink()
    assert manifest.verify(str(run / "step_0000006")) == []
    truncate(run / "step_0000006" / PARAM)
    problems = manifest.verify(str(run / "step_0000006"))
    assert len(problems) == 1 and PARAM in problems[0] and "truncated" in problems[0]


def test_truncated_safetensors_errors_name_the_file(tmp_path, cfg, state):
    """Read directly (no manifest check), a truncated file still gives its path."""
    run = make_run(tmp_path, cfg, state, steps=(3,))
    truncate(run / "step_0000003" / PARAM)
    with pytest.raises(CheckpointError, match=str(run / "step_0000003" / PARAM)):
        reshard.Record(str(run / "step_0000003")).state("param")
    with pytest.raises(CheckpointError, match="tp00-pp00.param.safetensors"):
        convert.read(str(run))
    d = tmp_path / "model"
    model_dir.save_tensors(str(d), state)
    truncate(d / "model.safetensors")
    with pytest.raises(model_dir.ModelDirError, match=str(d / "model.safetensors")):
        model_dir.load_tensors(str(d))


def test_convert_writes_a_manifest(tmp_path, cfg, state):
    convert.write_training(str(tmp_path / "out"), convert.Source("megagpt", cfg, state), 1, 1)
    assert manifest.verify(str(tmp_path / "out" / "step_0000000")) == []
    assert manifest.has_manifest(str(tmp_path / "out" / "step_0000000"))
