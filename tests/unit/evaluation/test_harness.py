"""The lm-eval model ``megagpt`` and the bundled task, against direct computations and against
lm-eval's own ``hf`` model on the same weights exported to Hugging Face."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.unit.evaluation.helpers import token_nll

pytest.importorskip("lm_eval")

TASK = "megagpt_zh_mc"
CLS = 101  # the test model's BERT vocabulary: every context starts with [CLS]


@pytest.fixture(scope="module")
def ours(scorer):
    """The bundled task through the harness with megagpt's model: (results, samples)."""
    from megagpt.evaluation import harness

    lm = harness.MegagptLM(scorer=scorer, batch_size=5)
    results = harness.run_tasks(lm, [TASK], log_samples=True)
    return results, sorted(results["samples"][TASK], key=lambda s: s["doc_id"])


def _choice_lls(sample) -> list[float]:
    return [float(r[0][0]) for r in sample["resps"]]


def _choice_greedy(sample) -> list[bool]:
    return [bool(r[0][1]) for r in sample["resps"]]


@torch.no_grad()
def _is_greedy(model, context: list[int], targets: list[int]) -> bool:
    """Whether every target token is the argmax of the model's logits at its position (one
    full forward, TP=1; plain torch, no megagpt scoring)."""
    seq = context + targets
    logits = model(torch.tensor([seq[:-1]]))[:, 0]  # [s, 1, V] -> [s, V]
    start = len(context) - 1
    return all(int(logits[start + i].argmax()) == t for i, t in enumerate(targets))


@torch.no_grad()
def _greedy_ids(model, ids: list[int], n: int) -> list[int]:
    """The model's n greedy next tokens after ``ids`` (plain torch argmax, no KV cache)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[-1, 0].argmax()))  # logits [s, 1, V]
    return seq[len(ids) :]


@pytest.fixture(scope="module")
def greedy_mix(scorer) -> list[tuple[str, str]]:
    """(context, continuation) loglikelihood requests with greedy continuations (1 and 3
    tokens) and continuations that leave the greedy path at their last token, or at their
    first and then follow it (so only a flag over every token is right). The bundled task's
    choices are never all greedy for this model, so without these the is-greedy flag would
    only ever be checked at False."""
    tok = scorer.tokenizer
    out = []
    for context in ("问题：", "人工智能"):
        greedy = _greedy_ids(scorer.model, [CLS] + tok.encode(context), 3)
        after_off = _greedy_ids(scorer.model, [CLS] + tok.encode(context + "的"), 1)
        out += [
            (context, tok.decode(greedy[:1])),
            (context, tok.decode(greedy)),
            (context, tok.decode(greedy[:2]) + "的"),
            (context, "的" + tok.decode(after_off)),
        ]
    return out


def test_task_items_are_well_formed():
    from megagpt.evaluation.harness import TASKS_DIR

    items = Path(TASKS_DIR) / TASK / "items.jsonl"
    rows = [json.loads(x) for x in items.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 40
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 for r in rows)
    assert sorted({r["answer"] for r in rows}) == [0, 1, 2, 3]  # answer positions rotate


def test_harness_equals_direct_computation(scorer, ours, greedy_mix):
    from megagpt.evaluation import harness

    results, samples = ours
    tok = scorer.tokenizer
    assert len(samples) == 40
    correct = 0
    flags = []
    for s in samples:
        doc = s["doc"]
        context = f"问题：{doc['question']}\n答案："
        want, want_greedy = [], []
        for choice in doc["choices"]:
            ctx = [CLS] + tok.encode(context)  # the BERT family reads [CLS] text
            cont = tok.encode(context + choice)[len(ctx) - 1 :]
            want.append(-sum(token_nll(scorer.model, ctx, cont)))
            want_greedy.append(_is_greedy(scorer.model, ctx, cont))
        assert _choice_lls(s) == pytest.approx(want, abs=1e-5)
        assert _choice_greedy(s) == want_greedy
        flags += want_greedy
        correct += int(max(range(4), key=lambda i: want[i]) == doc["answer"])
    assert results["results"][TASK]["acc,none"] == pytest.approx(correct / 40)
    # The same through lm-eval's loglikelihood entry point on requests that include greedy
    # continuations (batched 3 at a time: rows of different lengths share a forward pass).
    lm = harness.MegagptLM(scorer=scorer, batch_size=3)
    got = lm.loglikelihood(_instances("loglikelihood", greedy_mix))
    assert len(got) == len(greedy_mix)
    for (context, continuation), (ll, greedy) in zip(greedy_mix, got):
        ctx = [CLS] + tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx) - 1 :]
        assert ll == pytest.approx(-sum(token_nll(scorer.model, ctx, cont)), abs=1e-5)
        assert greedy == _is_greedy(scorer.model, ctx, cont), (context, continuation)
        flags.append(greedy)
    assert set(flags) == {True, False}  # the flag is checked both ways


def test_hf_export_scores_the_same_with_lm_eval_hf(
    bert_model_dir, scorer, ours, greedy_mix, tmp_path
):
    # lm-eval's hf model imports accelerate (lm-eval's "hf" extra).
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from megagpt.checkpoint.convert import convert
    from megagpt.evaluation.harness import task_manager

    convert(bert_model_dir, str(tmp_path / "hf"), "hf")

    class ClsFirstHFLM(HFLM):
        """lm-eval's hf model reading every context as [CLS] text, as the BERT family (and
        megagpt's model) does: the BERT tokenizer's own special tokens would add [SEP] at
        the end as well, hence add_bos_token=False and the [CLS] put in here."""

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            ids = super().tok_encode(string, add_special_tokens=False, **kwargs)
            return ids if add_special_tokens is False else [CLS] + ids

    hf = ClsFirstHFLM(
        pretrained=str(tmp_path / "hf"),
        add_bos_token=False,
        dtype="float32",
        device="cpu",
        batch_size=8,
    )
    assert hf.prefix_token_id == CLS and hf.eot_token_id == 102  # the export's bos / eos
    res = simple_evaluate(
        model=hf,
        tasks=[TASK],
        task_manager=task_manager([TASK]),
        log_samples=True,
        batch_size=8,
        verbosity="WARNING",
    )
    theirs = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    results, samples = ours
    for a, b in zip(samples, theirs, strict=True):
        assert _choice_lls(a) == pytest.approx(_choice_lls(b), abs=1e-4)
        assert _choice_greedy(a) == _choice_greedy(b)
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"][TASK][metric] == res["results"][TASK][metric]
    # The task's choices are never greedy here; requests with greedy continuations check the
    # flag at True as well (test_harness_equals_direct_computation asserts the mix has both).
    from megagpt.evaluation import harness

    lm = harness.MegagptLM(scorer=scorer, batch_size=3)
    mine = lm.loglikelihood(_instances("loglikelihood", greedy_mix))
    their = hf.loglikelihood(_instances("loglikelihood", greedy_mix))
    assert [g for _, g in mine] == [bool(g) for _, g in their]
    assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in their], abs=1e-4)
    # Rolling scores through lm-eval's plain hf model: the text's own ids, its first token
    # predicted from the export's bos ([CLS]).
    plain = HFLM(pretrained=str(tmp_path / "hf"), add_bos_token=False, device="cpu")
    texts = [("床前明月光，疑是地上霜。",), ("人工智能",)]
    mine = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    their = plain.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    assert mine == pytest.approx(their, abs=1e-4)


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_generate_until_equals_kv_cache_greedy_decoding(scorer):
    from megagpt.evaluation import harness
    from megagpt.inference.sampling import make_params

    lm = harness.MegagptLM(scorer=scorer, batch_size=2)
    prompts = ["床前明月光，", "中国的首都是", "人工智能"]
    kwargs = {"until": ["。"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until(_instances("generate_until", [(p, kwargs) for p in prompts]))
    tok = scorer.tokenizer
    for p, text in zip(prompts, got):
        ids = [CLS] + tok.encode(p)
        full = scorer.generator.generate([ids], make_params(top_k=1), max_new_tokens=6)[0][0]
        want = tok.decode(full[len(ids) :]).split("。")[0]
        assert text == want
    alone = [lm.generate_until(_instances("generate_until", [(p, kwargs)]))[0] for p in prompts]
    assert alone == got  # batching changes nothing
    # An `until` string inside the continuation cuts it there (and stops decoding early).
    stop = got[0][4:6]
    assert len(stop) == 2, got
    cut = lm.generate_until(
        _instances("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 6})])
    )[0]
    assert cut == got[0][: got[0].index(stop)]


def test_loglikelihood_rolling_is_the_document_nll(scorer):
    from megagpt.evaluation import harness

    lm = harness.MegagptLM(scorer=scorer, batch_size=3, max_length=12)
    texts = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "人工智能"]
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    tok = scorer.tokenizer
    for text, value in zip(texts, got):
        seq = [CLS] + tok.encode(text)  # the first token predicted from [CLS]
        want = 0.0
        for begin in range(0, len(seq) - 1, 12):  # disjoint 12-token windows
            want -= sum(
                token_nll(scorer.model, seq[begin : begin + 1], seq[begin + 1 : begin + 13])
            )
        assert value == pytest.approx(want, rel=1e-6)


def test_model_args_errors_and_registration(bert_model_dir):
    from lm_eval.api.registry import get_model

    from megagpt.evaluation import harness
    from megagpt.evaluation.model import EvalError

    assert get_model("megagpt") is harness.MegagptLM
    with pytest.raises(EvalError, match="unknown option"):
        harness.MegagptLM.create_from_arg_string(f"path={bert_model_dir},bogus=1")
    with pytest.raises(EvalError, match="needs --model_args path=DIR"):
        harness.MegagptLM.create_from_arg_string("")
    with pytest.raises(EvalError, match="batch_size='x'"):
        harness.MegagptLM.create_from_arg_string(f"path={bert_model_dir},batch_size=x")


def test_megagpt_eval_tasks_and_lm_eval_cli(bert_model_dir, tmp_path, monkeypatch):
    from megagpt.cli import main
    from megagpt.evaluation import lm_eval_cli

    out = tmp_path / "res.json"
    assert (
        main(
            [
                "eval",
                "--model",
                bert_model_dir,
                "--tasks",
                TASK,
                "--limit",
                "8",
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    ours = json.loads(out.read_text())
    acc = ours["metrics"][f"eval/{TASK}/acc"]
    # lm-eval's own command line, with --model megagpt registered by the wrapper.
    monkeypatch.chdir(tmp_path)
    lm_eval_cli.main(
        [
            "--model",
            "megagpt",
            "--model_args",
            f"path={bert_model_dir},device=cpu",
            "--tasks",
            TASK,
            "--limit",
            "8",
            "--output_path",
            str(tmp_path / "lm"),
        ]
    )
    files = list((tmp_path / "lm").rglob("results_*.json"))
    assert len(files) == 1
    theirs = json.loads(files[0].read_text())
    assert theirs["results"][TASK]["acc,none"] == pytest.approx(acc)


def test_scores_do_not_depend_on_the_batch(scorer):
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    together = scorer.token_logprobs([r[:-1] for r in rows], [r[1:] for r in rows])
    for r, (lp, _) in zip(rows, together):
        ((alone, _),) = scorer.token_logprobs([r[:-1]], [r[1:]])
        assert torch.allclose(lp, alone, atol=1e-6)


def test_unknown_task_is_reported_before_the_model_loads(tmp_path, capsys):
    from megagpt.cli import main

    # The model path does not exist either: the task names are checked first.
    assert main(["eval", "--model", str(tmp_path / "none"), "--tasks", "no_such_task_x"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) ['no_such_task_x']" in err, err
