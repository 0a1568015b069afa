"""Perplexity / bits per character: equal to a hand computation, sliding windows, datasets, CLI."""

from __future__ import annotations

import json
import math

import pytest

from megagpt.evaluation.model import EvalError
from megagpt.evaluation.perplexity import perplexity, windows
from tests.unit.evaluation.helpers import token_nll

TEXTS = [
    "床前明月光，疑是地上霜。",
    "人工智能正在改变世界。",
    "长江是中国最长的河流，全长约六千三百公里。",
]


CLS = 101  # the test model's BERT vocabulary reads [CLS] text


def _jsonl(path, texts):
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return str(path)


def test_perplexity_equals_hand_computation(scorer, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", TEXTS)
    summary, records = perplexity(scorer, data, batch_size=2)
    tok = scorer.tokenizer
    total, tokens = 0.0, 0
    for text, rec in zip(TEXTS, records):
        ids = tok.encode(text)
        nll = sum(token_nll(scorer.model, [CLS], ids))  # the first token after [CLS]
        assert rec["tokens"] == len(ids) and rec["characters"] == len(text)
        assert rec["nll"] == pytest.approx(nll, rel=1e-6)
        assert rec["bits_per_character"] == pytest.approx(nll / math.log(2) / len(text))
        total, tokens = total + nll, tokens + len(ids)
    chars = sum(len(t) for t in TEXTS)
    assert summary["tokens"] == tokens and summary["characters"] == chars
    assert summary["nll"] == pytest.approx(total, rel=1e-6)
    assert summary["perplexity"] == pytest.approx(math.exp(total / tokens))
    assert summary["bits_per_character"] == pytest.approx(total / math.log(2) / chars)
    assert summary["documents"] == 3
    assert summary["first_token_context"] == "bos"


def test_sliding_window_equals_full_context_when_the_doc_fits(scorer, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", TEXTS)
    full, _ = perplexity(scorer, data)
    small_stride, _ = perplexity(scorer, data, window=scorer.max_positions, stride=3)
    assert small_stride["nll"] == pytest.approx(full["nll"], rel=1e-9)


def test_long_document_windows_keep_context(scorer, tmp_path):
    text = "".join(TEXTS) * 4  # ~140 tokens: several 32-token windows
    data = _jsonl(tmp_path / "long.jsonl", [text])
    tok = scorer.tokenizer
    seq = [CLS] + tok.encode(text)
    w, s = 16, 4
    got, _ = perplexity(scorer, data, window=w, stride=s)
    # By hand: target j (1-based into seq) is scored in the first window reaching it, with
    # that window's context.
    want, done, begin = 0.0, 0, 0
    while done < len(seq) - 1:
        end = min(begin + w, len(seq) - 1)
        nll = token_nll(scorer.model, seq[begin : begin + 1], seq[begin + 1 : end + 1])
        want += sum(nll[done - begin :])
        done, begin = end, begin + s
    assert got["nll"] == pytest.approx(want, rel=1e-6)
    assert got["tokens"] == len(seq) - 1
    disjoint, _ = perplexity(scorer, data, window=w)
    assert disjoint["nll"] != pytest.approx(got["nll"], rel=1e-6)  # the stride matters


def test_windows_score_every_token_once():
    seq = list(range(50))
    for w, s in [(8, 8), (8, 3), (8, 1), (60, 5)]:
        ws = windows(0, seq, w, s)
        assert sum(x.scored for x in ws) == 49
        assert all(len(x.inputs) <= w and x.scored <= len(x.inputs) for x in ws)
        scored = [t for x in ws for t in x.targets[len(x.targets) - x.scored :]]
        assert scored == seq[1:]
        # After the first window, every scored token has at least w - s tokens of context.
        assert all(len(x.inputs) - x.scored >= w - s for x in ws[1:])
    with pytest.raises(EvalError, match="--stride 9"):
        windows(0, seq, 8, 9)


def test_text_and_indexed_datasets(scorer, tmp_path):
    from megagpt.data import make_input_spec, preprocess

    src = _jsonl(tmp_path / "d.jsonl", TEXTS)
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    from_jsonl, _ = perplexity(scorer, src)
    from_txt, _ = perplexity(scorer, str(txt))
    assert from_txt["nll"] == pytest.approx(from_jsonl["nll"], rel=1e-9)
    preprocess(
        [make_input_spec(src)],
        scorer.tokenizer.path,
        str(tmp_path / "idx"),
        append_eod=True,
        progress=False,
    )
    got, records = perplexity(scorer, str(tmp_path / "idx"))
    tok = scorer.tokenizer
    for text, rec in zip(TEXTS, records):
        # The stored document is [CLS] text [SEP]: its own [CLS] is the context (not doubled)
        # and its EOD is scored.
        ids = tok.encode(text) + [tok.eod]
        assert rec["tokens"] == len(ids)
        assert rec["nll"] == pytest.approx(sum(token_nll(scorer.model, [CLS], ids)), rel=1e-6)
    assert perplexity(scorer, str(tmp_path / "idx.bin"))[0]["nll"] == got["nll"]


def test_cli_writes_summary_and_per_document(bert_model_dir, tmp_path, capsys):
    from megagpt.cli import main

    data = _jsonl(tmp_path / "d.jsonl", TEXTS + [""])
    out, per_doc = tmp_path / "res" / "ppl.json", tmp_path / "docs.jsonl"
    assert (
        main(
            [
                "eval",
                "--model",
                bert_model_dir,
                "--data",
                data,
                "--device",
                "cpu",
                "--output",
                str(out),
                "--per-document",
                str(per_doc),
                "--stride",
                "8",
                "--skip-bad-lines",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())["perplexity"]
    assert res["documents"] == 3 and res["skipped_records"] == {"empty-document": 1}
    assert res["stride"] == 8
    docs = [json.loads(x) for x in per_doc.read_text().splitlines()]
    assert [d["index"] for d in docs] == [0, 1, 2]
    assert sum(d["nll"] for d in docs) == pytest.approx(res["nll"])


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "needs --data FILE"),
        (["--data", "EMPTY"], "d.jsonl:4: empty document"),
        (["--data", "NOPE.jsonl"], "--data NOPE.jsonl: no such file or indexed dataset"),
        (["--data", "D", "--window", "64"], "--window 64: must be between 1 and the model's 32"),
        (["--data", "D", "--stride", "0"], "--stride must be >= 1"),
        (["--tasks", "megagpt_zh_mc", "--per-document", "x.jsonl"], "--per-document needs --data"),
    ],
)
def test_cli_errors_name_the_option(bert_model_dir, tmp_path, capsys, argv, message):
    from megagpt.cli import main

    data = _jsonl(tmp_path / "d.jsonl", TEXTS + [""])
    argv = [
        data if a == "EMPTY" else _jsonl(tmp_path / "ok.jsonl", TEXTS) if a == "D" else a
        for a in argv
    ]
    assert main(["eval", "--model", bert_model_dir, "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megagpt eval: error:") and message in err, err


def test_bad_model_path_is_a_user_error(tmp_path, capsys):
    from megagpt.cli import main

    data = _jsonl(tmp_path / "d.jsonl", TEXTS)
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", data]) == 2
    assert "no such model directory or checkpoint" in capsys.readouterr().err


def test_training_checkpoint_of_any_layout_scores_like_the_model_dir(
    bert_model_dir, scorer, tmp_path, capsys
):
    """A training checkpoint (here written for TP=2 x PP=2) is read through the checkpoint
    package's reshard path and scores exactly as its model directory."""
    from megagpt.checkpoint.convert import convert
    from megagpt.cli import main

    data = _jsonl(tmp_path / "d.jsonl", TEXTS)
    convert(bert_model_dir, str(tmp_path / "ckpt"), "megagpt", tp=2, pp=2)
    want, _ = perplexity(scorer, data)
    out = tmp_path / "ppl.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "ckpt"),
                "--data",
                data,
                "--device",
                "cpu",
                "--tokenizer",
                scorer.tokenizer.path,
                "--output",
                str(out),
            ]
        )
        == 0
    )
    got = json.loads(out.read_text())["perplexity"]
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-6)
    # Converted from a model directory, the checkpoint names no tokenizer: say which flag.
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", data]) == 2
    assert "give --tokenizer" in capsys.readouterr().err


def test_a_family_without_bos_predicts_every_document_after_an_eod(tmp_path_factory, tmp_path):
    """jieba-BPE has no bos: a stored document is scored after an end-of-document context even
    when it starts with one itself (a document made of its EOD alone is scored once)."""
    from megagpt.evaluation.model import load_scorer
    from tests.unit.data.conftest import write_dataset
    from tests.unit.inference.conftest import shared_assets

    scorer = load_scorer(shared_assets(tmp_path_factory)["model"], device="cpu", dtype="fp32")
    tok = scorer.tokenizer
    assert tok.bos is None and tok.eod is not None
    docs = [tok.encode("北京") + [tok.eod], [tok.eod]]
    prefix = write_dataset(tmp_path / "ds", docs)
    summary, records = perplexity(scorer, prefix)
    assert summary["documents"] == 2 and summary["first_token_context"] == "eod"
    for doc, rec in zip(docs, records):
        assert rec["tokens"] == len(doc)
        assert rec["nll"] == pytest.approx(sum(token_nll(scorer.model, [tok.eod], doc)), rel=1e-6)
