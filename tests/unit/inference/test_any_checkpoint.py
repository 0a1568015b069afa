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


def _with_settings(directory, **settings) -> None:
    import json
    from pathlib import Path

    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(settings)
    path.write_text(json.dumps(config))


def test_a_modelscope_configs_decoding_defaults_are_the_pipelines(
    pipe, tiny_model_dir, tmp_path, capsys
):
    """ModelScope's pipeline decodes with config.json's top_k / top_p / temperature /
    tokens_to_generate (reference §4.2): so does megagpt's, from the directory and from the
    model directory converted from it, and an export writes them back."""
    import json

    from megagpt import pipeline
    from megagpt.cli import main

    ms = tmp_path / "ms"
    convert(tiny_model_dir, str(ms), "modelscope")
    _with_settings(ms, top_k=1, top_p=0.0, tokens_to_generate=5)
    greedy5 = pipe(PROMPTS, top_k=1, max_new_tokens=5)
    other = pipeline("text-generation", model=str(ms), device="cpu")
    assert other(PROMPTS) == greedy5  # no options: the config's greedy, 5 new tokens
    assert other(PROMPTS, max_new_tokens=3) == pipe(PROMPTS, top_k=1, max_new_tokens=3)
    sampled = {"top_p": 0.9, "seed": 3, "max_new_tokens": 6}  # a call's filter replaces both
    assert other(PROMPTS, **sampled) == pipe(PROMPTS, **sampled)
    assert main(["generate", "--model", str(ms), "--prompt", PROMPTS[0]]) == 0
    assert capsys.readouterr().out.strip() == greedy5[0]["text"]
    # Converted to a megagpt directory and back, the settings travel.
    convert(str(ms), str(tmp_path / "model"), "megagpt")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["generation"]
    assert saved == {"top_k": 1, "top_p": 0.0, "temperature": 1.0, "tokens_to_generate": 5}
    model = pipeline("text-generation", model=str(tmp_path / "model"), device="cpu")
    assert model(PROMPTS) == greedy5
    convert(str(tmp_path / "model"), str(tmp_path / "back"), "modelscope")
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["top_k"], back["top_p"], back["tokens_to_generate"]) == (1, 0.0, 5)
    # The model's defaults apply to megagpt serve's /generate too (the app in-process: no
    # uvicorn, whose log handlers would keep this test's captured stderr).
    from starlette.testclient import TestClient

    from megagpt.serving.app import Service, create_app
    from megagpt.serving.engine import Engine

    engine = Engine(other.generator, 2)
    engine.start()
    try:
        client = TestClient(create_app(Service(engine, other.tokenizer, "m")))
        r = client.post("/generate", json={"text": PROMPTS[0]})
        assert r.status_code == 200 and r.json() == greedy5[0]
    finally:
        engine.close()
    # A call's options checked against the model's defaults: two copies of greedy decoding.
    assert (
        main(["generate", "--model", str(ms), "--prompt", "x", "--num-return-sequences", "2"]) == 2
    )
    assert "greedy decoding" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings, warning",
    [
        ({"top_k": 50, "top_p": 0.9}, "cannot be combined"),
        ({"top_p": 2.0}, r"top_p must be in \[0, 1\]"),
        ({"temperature": 0}, "temperature must be"),
        ({"top_k": 5000}, "smaller than the vocabulary"),
        ({"top_k": "ten"}, "top_k='ten' is not an integer"),
        ({"tokens_to_generate": 0}, "tokens_to_generate must be >= 1"),
    ],
)
def test_decoding_settings_no_sampler_takes_do_not_stop_the_model_loading(
    pipe, tiny_model_dir, tmp_path, settings, warning
):
    """They only guide decoding (ModelScope too only fails once it samples): a warning names
    the file and the key, and the original's defaults apply."""
    from megagpt import pipeline

    ms = tmp_path / "ms"
    convert(tiny_model_dir, str(ms), "modelscope")
    _with_settings(ms, **settings)
    with pytest.warns(UserWarning, match=warning):
        other = pipeline("text-generation", model=str(ms), device="cpu")
    assert other(PROMPTS[0], seed=1) == pipe(PROMPTS[0], seed=1)
