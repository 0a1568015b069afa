"""ModelScope GPT-3 import (both families, 1 and 2 shards), export to the layout the tokenizer
calls for (BERT vocab.txt: base/large; jieba-BPE tokenizer.json or none: 1.3B+), errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from argparse import Namespace

import pytest
import torch

from megagpt.checkpoint import modelscope
from megagpt.checkpoint.canonical import (
    WORD,
    CheckpointError,
    qkv_blocks_to_interleaved,
    qkv_interleaved_to_blocks,
)
from tests.conftest import BERT_VOCAB, CPM_MODEL, shared_path
from tests.unit.checkpoint.conftest import (
    BERT_SEP_ID,
    JIEBA_EOD_ID,
    build_base_dir,
    build_distributed_dir,
    random_state,
    write_bert_vocab,
    write_jieba_tokenizer,
)


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def test_qkv_permutation_moves_each_head_row_to_its_place():
    heads, hd = 4, 3
    # blocks layout row r = kind * heads * hd + head * hd + d; encode (kind, head, d) in the value
    blocks = torch.tensor(
        [
            [kind * 100 + head * 10 + d]
            for kind in range(3)
            for head in range(heads)
            for d in range(hd)
        ],
        dtype=torch.float32,
    )
    inter = qkv_blocks_to_interleaved(blocks, heads)
    for head in range(heads):
        for kind in range(3):
            for d in range(hd):
                assert inter[head * 3 * hd + kind * hd + d, 0] == kind * 100 + head * 10 + d
    assert torch.equal(qkv_interleaved_to_blocks(inter, heads), blocks)


@pytest.mark.parametrize("wrap", [False, True])
def test_import_base_family(tmp_path, cfg, state, wrap):
    build_base_dir(tmp_path / "ms", cfg, state, wrap=wrap)
    got_cfg, tensors, tok = modelscope.read(str(tmp_path / "ms"))
    assert_same(tensors, state)
    assert got_cfg.activation == "gelu" and got_cfg.layernorm_eps == 1e-12
    assert (got_cfg.num_layers, got_cfg.num_heads, got_cfg.vocab_size) == (2, 4, 96)
    assert tok.endswith("vocab.txt")


def test_base_family_computes_the_erf_gelu_whatever_hidden_act_says(tmp_path, cfg, state):
    # ModelScope's GPT3Model calls F.gelu (erf) and never reads hidden_act (reference §1.2).
    build_base_dir(tmp_path / "ms", cfg, state)
    conf = json.loads((tmp_path / "ms" / "config.json").read_text())
    conf["hidden_act"] = "gelu_new"
    (tmp_path / "ms" / "config.json").write_text(json.dumps(conf))
    assert modelscope.read(str(tmp_path / "ms"))[0].activation == "gelu"


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("wrap", [False, True])
def test_import_distributed_family(tmp_path, cfg, state, tp, wrap):
    build_distributed_dir(tmp_path / "ms", cfg, state, tp, wrap=wrap)
    got_cfg, tensors, tok = modelscope.read(str(tmp_path / "ms"))
    assert_same(tensors, state)
    assert got_cfg.activation == "gelu_tanh"  # bias_gelu_fusion defaults to True
    assert tok.endswith("tokenizer.json")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_export_matches_hand_built_shards_and_round_trips(tmp_path, cfg, state, tp):
    tok = tmp_path / "tokenizer.json"
    write_jieba_tokenizer(tok)
    written = modelscope.write(str(tmp_path / "out"), cfg, state, tp=tp, tokenizer=str(tok))
    assert written.layout == "distributed" and not written.warnings
    paths = written.files
    want = build_distributed_dir(tmp_path / "ref", cfg, state, tp, wrap=False)
    for r, path in enumerate(paths):
        got = torch.load(path, weights_only=True)
        assert_same(got, want[r])
    conf = json.loads((tmp_path / "out" / "configuration.json").read_text())
    assert conf["megatron"]["tensor_model_parallel_size"] == tp
    assert conf["pipeline"]["type"] == "gpt3-generation"
    back_cfg, back, _ = modelscope.read(str(tmp_path / "out"))  # import o export is exact
    assert_same(back, state)
    assert back_cfg.activation == cfg.activation and back_cfg.layernorm_eps == cfg.layernorm_eps


def test_base_import_then_export_then_import(tmp_path, cfg, state):
    """A base/large directory goes out as base/large again: the 1.3B+ layout it used to get
    needs a tokenizer.json, so ModelScope could not load it with the model's vocab.txt."""
    build_base_dir(tmp_path / "base", cfg, state)
    c, t, tok = modelscope.read(str(tmp_path / "base"))
    written = modelscope.write(str(tmp_path / "out"), c, t, tokenizer=tok)
    assert written.layout == "base" and not written.warnings
    assert written.files == [str(tmp_path / "out" / "pytorch_model.bin")]
    assert not (tmp_path / "out" / "model").exists()
    c2, t2, tok2 = modelscope.read(str(tmp_path / "out"))
    assert_same(t2, state)
    assert c2.activation == "gelu" and tok2.endswith("vocab.txt")


def base_key_names(layers: int) -> set[str]:
    """GPT3Model's state-dict keys (reference §3.1), spelled out rather than derived."""
    names = {
        "language_model.word_embeddings.weight",
        "language_model.position_embeddings.weight",
        "language_model.transformer.final_layernorm.weight",
        "language_model.transformer.final_layernorm.bias",
    }
    modules = (
        "input_layernorm",
        "attention.query_key_value",
        "attention.dense",
        "post_attention_layernorm",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    )
    for i in range(layers):
        for module in modules:
            for leaf in ("weight", "bias"):
                names.add(f"language_model.transformer.layers.{i}.{module}.{leaf}")
    return names


def test_bert_tokenizer_exports_the_base_layout(tmp_path, cfg, state):
    """With the BERT vocab.txt the export is what ModelScope's GPT3Model + text-generation
    pipeline load: one raw pytorch_model.bin with the base keys and all-Q/all-K/all-V rows."""
    vocab = shared_path(BERT_VOCAB)
    cfg = dataclasses.replace(cfg, activation="gelu")
    out = tmp_path / "out"
    modelscope.write(str(out), cfg, state, tokenizer=str(vocab))
    assert sorted(f.name for f in out.iterdir()) == [
        "config.json",
        "configuration.json",
        "pytorch_model.bin",
        "vocab.txt",
    ]
    assert (out / "vocab.txt").read_bytes() == vocab.read_bytes()
    assert json.loads((out / "configuration.json").read_text()) == {
        "framework": "pytorch",
        "task": "text-generation",
        "preprocessor": {"type": "text-gen-tokenizer"},
        "model": {"type": "gpt3"},
        "pipeline": {"type": "text-generation"},
    }  # no "megatron" key: ModelScope builds GPT3Model and a BertTokenizer
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert set(sd) == base_key_names(cfg.num_layers)
    assert torch.equal(sd["language_model.word_embeddings.weight"], state[WORD])
    assert torch.equal(
        sd["language_model.transformer.layers.1.attention.dense.weight"],
        state["layers.1.attention.dense.weight"],
    )
    # GPT3Model splits the fused output into thirds: rows [kind * h + head * hd, + hd) are
    # that head's q (kind 0), k (1) or v (2); megagpt keeps each head's q|k|v together.
    h, hd = cfg.hidden_size, cfg.head_dim
    for leaf in ("weight", "bias"):
        exported = sd[f"language_model.transformer.layers.1.attention.query_key_value.{leaf}"]
        canonical = state[f"layers.1.attention.query_key_value.{leaf}"]
        for kind in range(3):
            for head in range(cfg.num_heads):
                got = exported[kind * h + head * hd : kind * h + (head + 1) * hd]
                want = canonical[(3 * head + kind) * hd : (3 * head + kind + 1) * hd]
                assert torch.equal(got, want), (leaf, kind, head)
    back_cfg, back, tok = modelscope.read(str(out))  # import o export is exact
    assert_same(back, state)
    assert back_cfg.activation == "gelu" and tok == str(out / "vocab.txt")


@pytest.mark.parametrize("family", ["bert", "jieba-bpe"])
@pytest.mark.parametrize("as_folder", [False, True])
def test_config_json_has_the_tokenizers_eod_and_generation_defaults(
    tmp_path, cfg, state, family, as_folder
):
    """ModelScope stops generating at config.json's eod_id (id 1 when it is absent): it is the
    tokenizer's end-of-document token, given as a file (under any name) or a folder."""
    from megagpt.data.tokenizer import build_tokenizer
    from megagpt.inference.sampling import DEFAULT_NEW_TOKENS, SamplingParams

    src = tmp_path / "tok"
    src.mkdir()
    if family == "bert":
        vocab = shared_path(BERT_VOCAB)
        f = src / ("vocab.txt" if as_folder else "chinese_vocab.txt")
        shutil.copy(vocab, f)
        eod = vocab.read_text(encoding="utf-8").splitlines().index("[SEP]")
        cfg = dataclasses.replace(cfg, activation="gelu")
        ms_name = "vocab.txt"
    else:
        f = src / ("tokenizer.json" if as_folder else "my_tokenizer.json")
        write_jieba_tokenizer(f)
        eod = JIEBA_EOD_ID
        ms_name = "tokenizer.json"
    given = str(src if as_folder else f)
    assert build_tokenizer(given).eod == eod != 1
    written = modelscope.write(str(tmp_path / "out"), cfg, state, tokenizer=given)
    assert written.layout == {"bert": "base", "jieba-bpe": "distributed"}[family]
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["eod_id"] == eod
    defaults = SamplingParams()
    assert (conf["top_k"], conf["top_p"], conf["temperature"], conf["tokens_to_generate"]) == (
        defaults.top_k,
        defaults.top_p,
        defaults.temperature,
        DEFAULT_NEW_TOKENS,
    )
    assert (tmp_path / "out" / ms_name).read_bytes() == f.read_bytes()  # the name ModelScope opens


def test_base_layout_refuses_what_gpt3model_cannot_be(tmp_path, cfg, state):
    """GPT3Model is single-GPU, exact-erf-GELU and 4h-MLP only: a BERT-tokenizer model that is
    not is refused naming the option, before any file is written."""
    vocab = tmp_path / "vocab.txt"
    write_bert_vocab(vocab, cfg.vocab_size)
    gelu = dataclasses.replace(cfg, activation="gelu")
    with pytest.raises(CheckpointError, match=r"--tp 2: .*BERT vocab\.txt.*base/large"):
        modelscope.write(str(tmp_path / "o1"), gelu, state, tp=2, tokenizer=str(vocab))
    with pytest.raises(
        CheckpointError, match=r"model\.activation is 'gelu_tanh'.*exact erf GELU \('gelu'\)"
    ):
        modelscope.write(str(tmp_path / "o2"), cfg, state, tokenizer=str(vocab))
    wide = dataclasses.replace(gelu, ffn_hidden_size=64)
    with pytest.raises(CheckpointError, match=r"model\.ffn_hidden_size is 64.*= 128"):
        modelscope.write(str(tmp_path / "o3"), wide, random_state(wide), tokenizer=str(vocab))
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_sentencepiece_tokenizer_is_refused(tmp_path, cfg, state):
    with pytest.raises(
        CheckpointError,
        match=r"chinese_vocab\.model is a SentencePiece model.*gpt3-generation\) needs a "
        r"jieba-BPE tokenizer\.json.*text-generation\) a BERT vocab\.txt",
    ):
        modelscope.write(str(tmp_path / "out"), cfg, state, tokenizer=str(shared_path(CPM_MODEL)))
    assert not (tmp_path / "out").exists()


def test_unreadable_tokenizer_is_refused(tmp_path, cfg, state):
    """The layout and eod_id come from the tokenizer: one megagpt cannot read is named, not
    copied into a directory ModelScope would then fail on."""
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"cannot read the model's tokenizer .*tokenizer"):
        modelscope.write(str(tmp_path / "out"), cfg, state, tokenizer=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_no_tokenizer_writes_the_weights_and_says_what_is_missing(tmp_path, cfg, state):
    written = modelscope.write(str(tmp_path / "out"), cfg, state)
    assert written.layout == "distributed" and len(written.files) == 1
    assert "eod_id" not in json.loads((tmp_path / "out" / "config.json").read_text())
    line = written.describe("OUT")
    assert line.startswith("ModelScope 1.3B+ layout OUT (1 shard); warning: ")
    assert "no tokenizer" in line and "tokenizer.json" in line and "eod_id" in line


def test_convert_summary_names_the_layout_written(tmp_path, cfg, state, capsys):
    """`megagpt convert --to modelscope` says which layout it wrote (and what is missing), and
    refuses --tp for a BERT-tokenizer model in one line naming it."""
    from megagpt.checkpoint import model_dir
    from megagpt.cli import main

    gelu = dataclasses.replace(cfg, activation="gelu")
    write_bert_vocab(tmp_path / "vocab.txt", cfg.vocab_size)
    for name, tok in (("bert", str(tmp_path / "vocab.txt")), ("bare", None)):
        model_dir.save_tensors(str(tmp_path / name), state)
        model_dir.write_config(str(tmp_path / name), gelu)
        if tok:
            model_dir.copy_tokenizer(str(tmp_path / name), tok)

    def convert(name: str, out: str, *extra: str) -> int:
        args = ["--input", str(tmp_path / name), "--output", str(tmp_path / out)]
        return main(["convert", *args, "--to", "modelscope", *extra])

    assert convert("bert", "ms-base") == 0
    assert f"ModelScope base/large layout {tmp_path / 'ms-base'}" in capsys.readouterr().out
    assert modelscope.family(str(tmp_path / "ms-base")) == "base"
    conf = json.loads((tmp_path / "ms-base" / "config.json").read_text())
    assert conf["eod_id"] == BERT_SEP_ID
    assert convert("bare", "ms-bare", "--tp", "2") == 0
    out = capsys.readouterr().out
    assert f"ModelScope 1.3B+ layout {tmp_path / 'ms-bare'} (2 shards); warning:" in out
    assert "no tokenizer" in out
    assert convert("bert", "ms-tp2", "--tp", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tp 2" in err[0] and "base/large" in err[0], err
    assert not (tmp_path / "ms-tp2").exists()


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_refuses_files_that_need_unpickling(tmp_path, cfg, state):
    build_base_dir(tmp_path / "ms", cfg, state)
    torch.save({"state_dict": {}, "args": Evil()}, tmp_path / "ms" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load.*arbitrary unpickling"):
        modelscope.read(str(tmp_path / "ms"))


def test_megatron_args_beside_the_weights_are_read(tmp_path, cfg, state):
    """Megatron's save_checkpoint stores its argparse.Namespace ``args`` (plain values) beside
    the weights; such a shard is read without unpickling anything else, and a Namespace that
    carries an object of another class is still refused."""
    shards = build_distributed_dir(tmp_path / "ms", cfg, state, 2)
    for r, sd in enumerate(shards):
        args = Namespace(tensor_model_parallel_size=2, params_dtype=torch.float16, rank=r)
        wrapped = {"module": sd, "args": args, "checkpoint_version": 3.0, "iteration": 7}
        torch.save(wrapped, tmp_path / "ms" / "model" / f"mp_rank_{r:02d}_model_states.pt")
    assert_same(modelscope.read(str(tmp_path / "ms"))[1], state)
    bad = {"module": shards[0], "args": Namespace(hook=Evil())}
    torch.save(bad, tmp_path / "ms" / "model" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00.*refusing to load"):
        modelscope.read(str(tmp_path / "ms"))


def test_megatron_args_on_a_torch_without_scoped_safe_globals(tmp_path, cfg, state, monkeypatch):
    # torch 2.4 (the floor in pyproject) has add_safe_globals but not the safe_globals context.
    monkeypatch.delattr(torch.serialization, "safe_globals")
    shards = build_distributed_dir(tmp_path / "ms", cfg, state, 1)
    path = tmp_path / "ms" / "model" / "mp_rank_00_model_states.pt"
    torch.save({"module": shards[0], "args": Namespace(rank=0)}, path)
    assert_same(modelscope.read(str(tmp_path / "ms"))[1], state)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, cfg, state):
    shards = build_distributed_dir(tmp_path / "ms", cfg, state, 1, wrap=False)
    sd = shards[0]
    key = "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"
    sd[key] = sd[key][:, :100]
    torch.save(sd, tmp_path / "ms" / "model" / "mp_rank_00_model_states.pt")
    with pytest.raises(
        CheckpointError,
        match=r"layers\.1\.mlp\.dense_4h_to_h\.weight.*"
        r"\[32, 100\].*\[32, 128\]",
    ):
        modelscope.read(str(tmp_path / "ms"))


def test_missing_and_unexpected_keys(tmp_path, cfg, state):
    shards = build_distributed_dir(tmp_path / "ms", cfg, state, 1, wrap=False)
    sd = dict(shards[0])
    del sd["language_model.encoder.final_layernorm.bias"]
    torch.save(sd, tmp_path / "ms" / "model" / "mp_rank_00_model_states.pt")
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor 'final_norm\.final_layernorm"
        r"\.bias' \(expected shape \[32\]\)",
    ):
        modelscope.read(str(tmp_path / "ms"))
    sd["language_model.output_layer.weight"] = torch.zeros(96, 32)
    torch.save(sd, tmp_path / "ms" / "model" / "mp_rank_00_model_states.pt")
    with pytest.raises(
        CheckpointError,
        match=r"unexpected key 'language_model\.output_layer"
        r"\.weight' with shape \[96, 32\]",
    ):
        modelscope.read(str(tmp_path / "ms"))


def test_vocab_mismatch_and_head_count(tmp_path, cfg, state):
    build_distributed_dir(tmp_path / "ms", cfg, state, 2)
    conf = json.loads((tmp_path / "ms" / "config.json").read_text())
    (tmp_path / "ms" / "config.json").write_text(json.dumps({**conf, "vocab_size": 100}))
    with pytest.raises(
        CheckpointError,
        match=r"word_embeddings\.weight' has shape \[96, 32\], "
        r"the model expects \[100, 32\]",
    ):
        modelscope.read(str(tmp_path / "ms"))
    (tmp_path / "ms" / "config.json").write_text(json.dumps({**conf, "num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match="5 attention heads do not divide hidden size 32"):
        modelscope.read(str(tmp_path / "ms"))


def test_export_refuses_unsplittable_vocab(tmp_path, cfg, state):
    odd = cfg.__class__(**{**cfg.__dict__, "vocab_size": 95})
    st = dict(state)
    st["embedding.word.word_embeddings.weight"] = state["embedding.word.word_embeddings.weight"][
        :95
    ]
    with pytest.raises(CheckpointError, match=r"vocabulary 95 does not split into 2 TP shards"):
        modelscope.write(str(tmp_path / "out"), odd, st, tp=2)


def test_cli_round_trip_through_every_kind(tmp_path, cfg, state):
    """ModelScope 2 shards -> megagpt model dir -> HF -> megagpt -> ModelScope base-free 1 shard:
    the tensors never change."""
    from megagpt.checkpoint import convert, model_dir
    from megagpt.cli import main

    build_distributed_dir(tmp_path / "ms", cfg, state, 2)
    assert convert.detect(str(tmp_path / "ms")) == "modelscope"
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "ms"),
                "--output",
                str(tmp_path / "m1"),
                "--to",
                "megagpt",
            ]
        )
        == 0
    )
    assert convert.detect(str(tmp_path / "m1")) == "megagpt"
    assert_same(model_dir.load_tensors(str(tmp_path / "m1")), state)
    assert (tmp_path / "m1" / "tokenizer" / "tokenizer.json").is_file()
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "m1"),
                "--output",
                str(tmp_path / "hf"),
                "--to",
                "hf",
            ]
        )
        == 0
    )
    assert convert.detect(str(tmp_path / "hf")) == "hf"
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "hf"),
                "--output",
                str(tmp_path / "m2"),
                "--to",
                "megagpt",
            ]
        )
        == 0
    )
    assert_same(model_dir.load_tensors(str(tmp_path / "m2")), state)
    assert model_dir.read_config(str(tmp_path / "m2")).activation == "gelu_tanh"
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "m2"),
                "--output",
                str(tmp_path / "ms2"),
                "--to",
                "modelscope",
                "--tp",
                "4",
            ]
        )
        == 0
    )
    assert_same(modelscope.read(str(tmp_path / "ms2"))[1], state)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from megagpt.checkpoint.convert import run

    (tmp_path / "junk").mkdir()
    rc = run(
        Namespace(
            input=str(tmp_path / "junk"), output=str(tmp_path / "o"), to="hf", tp=None, pp=None
        )
    )
    assert rc == 2 and "not a checkpoint megagpt knows" in capsys.readouterr().err
    rc = run(
        Namespace(
            input=str(tmp_path / "nope"), output=str(tmp_path / "o"), to="hf", tp=None, pp=None
        )
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = run(
        Namespace(input=str(tmp_path / "junk"), output=str(tmp_path / "o"), to="hf", tp=2, pp=None)
    )
    assert rc == 2 and "--to hf takes no --tp/--pp" in capsys.readouterr().err
