"""Generation reads any checkpoint ``megagpt convert`` reads, as it is: a ModelScope or Hugging
Face directory generates what the megagpt model directory it came from generates, in the
pipeline, ``megagpt generate`` and ``megagpt serve``'s checks; a checkpoint without a tokenizer
takes ``--tokenizer``."""

from __future__ import annotations

import pytest

from megagpt.checkpoint.convert import convert

PROMPTS = ["中华人民共和国", "床前明月光，"]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    for kind in ("modelscope", "hf"):
        convert(tiny_model_dir, str(root / kind), kind)
    return root


def test_the_pipeline_generates_from_every_kind_alike(pipe, exported):
    from megagpt import pipeline

    want = pipe(PROMPTS, top_k=1, max_new_tokens=12)
    for kind in ("modelscope", "hf"):
        other = pipeline("text-generation", model=str(exported / kind), device="cpu")
        assert other(PROMPTS, top_k=1, max_new_tokens=12) == want, kind


def test_the_cli_reads_a_checkpoint_and_takes_a_tokenizer(
    tiny_model_dir, exported, tmp_path, capsys
):
    from megagpt.checkpoint.convert import read_weights
    from megagpt.checkpoint.modelscope import write
    from megagpt.cli import main

    base = ["generate", "--prompt", PROMPTS[0], "--top-k", "1", "--max-new-tokens", "8"]
    assert main([*base, "--model", tiny_model_dir]) == 0
    want = capsys.readouterr().out
    assert main([*base, "--model", str(exported / "modelscope")]) == 0
    assert capsys.readouterr().out == want
    # Weights without a tokenizer: the error names the flag, and the flag supplies one.
    cfg, tensors = read_weights(tiny_model_dir)
    write(str(tmp_path / "bare"), cfg, tensors)
    assert main([*base, "--model", str(tmp_path / "bare")]) == 2
    assert "names no tokenizer" in capsys.readouterr().err
    tok = str(exported / "modelscope" / "tokenizer.json")
    assert main([*base, "--model", str(tmp_path / "bare"), "--tokenizer", tok]) == 0
    assert capsys.readouterr().out == want
    assert main([*base, "--model", str(tmp_path / "bare"), "--tokenizer", "/no/such"]) == 2
    assert "--tokenizer /no/such: no such file" in capsys.readouterr().err
