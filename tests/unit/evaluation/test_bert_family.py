"""The BERT family (ModelScope's base/large) reads ``[CLS] text``: generation, serving and
fine-tuning's evaluation prompts start with ``[CLS]`` (reference §2.1), and the text shown
never contains it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megagpt.inference.sampling import make_params

CLS, SEP = 101, 102
GREEDY = make_params(top_k=1)


@pytest.fixture(scope="module")
def pipe(bert_model_dir):
    from megagpt import pipeline

    return pipeline("text-generation", model=bert_model_dir, device="cpu")


def test_prompts_start_with_cls(pipe):
    tok = pipe.tokenizer
    ids = tok.encode("床前明月光")
    assert pipe.encode("床前明月光") == [CLS, *ids]
    assert pipe.encode("") == [CLS]  # an empty prompt starts a text, not after [SEP]
    out = pipe("床前明月光", top_k=1, max_new_tokens=6)["text"]
    from_cls = pipe.generator.generate([[CLS, *ids]], GREEDY, max_new_tokens=6)[0][0]
    assert out == tok.decode(from_cls) and "[CLS]" not in out
    # Not vacuous: the same prompt without [CLS] continues differently in this model.
    bare = pipe.generator.generate([ids], GREEDY, max_new_tokens=6)[0][0]
    assert tok.decode(bare) != out


def test_serving_encodes_prompts_as_the_pipeline(pipe):
    from megagpt.serving.app import Service

    service = Service(SimpleNamespace(generator=None), pipe.tokenizer, "m")
    for text in ("北京", ""):
        assert service.encode(text) == pipe.encode(text)
    assert service.encode([5, 6]) == [5, 6]  # token prompts are taken as given


def test_a_cut_context_keeps_cls_first(scorer):
    """Left truncation (a context longer than max_length; generation prompts; fine-tuning's
    evaluation prompts) keeps the text's [CLS] in front of the last tokens."""
    pytest.importorskip("lm_eval")
    from megagpt.evaluation import harness
    from tests.unit.evaluation.helpers import token_nll

    tok = scorer.tokenizer
    assert tok.last([CLS, 5, 6, 7, 8], 3) == [CLS, 7, 8] and tok.last([5, 6, 7], 2) == [6, 7]
    assert tok.last([CLS, 5], 3) == [CLS, 5]
    lm = harness.MegagptLM(scorer=scorer, batch_size=2, max_length=8)
    context, continuation = "床前明月光，疑是地上霜。", "举头"
    ((ll, _),) = lm.loglikelihood(_instances([(context, continuation)]))
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx) :]
    kept = [CLS, *(ctx + cont)[-8:]]  # [CLS] + the last max_length tokens
    want = -sum(token_nll(scorer.model, kept[: len(kept) - len(cont)], cont))
    assert ll == pytest.approx(want, abs=1e-5)


def _instances(args):
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i)
        for i, a in enumerate(args)
    ]
