"""Beam search (megagpt/inference/beam.py) against Hugging Face ``generate(num_beams=...)`` on
the same weights exported to a GPT2LMHeadModel: the same hypotheses, in the same order, with
the same scores, for several beam widths, length penalties and stop tokens."""

from __future__ import annotations

import json

import pytest
import torch

from megagpt.inference.beam import beam_search
from megagpt.inference.sampling import make_params

PROMPTS = ["中华人民共和国", "北京", "床前明月光"]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir, tmp_path_factory):
    from transformers import GPT2LMHeadModel

    from megagpt.checkpoint.convert import convert

    out = tmp_path_factory.mktemp("beam") / "hf"
    convert(tiny_model_dir, str(out), "hf")
    return GPT2LMHeadModel.from_pretrained(str(out)).eval()


def _hf_beams(model, ids, stops, k, new, length_penalty):
    """HF's k hypotheses (ids cut before the first stop token) and scores; early_stopping
    "never" stops only when no live beam can still win, as ours does."""
    out = model.generate(
        torch.tensor([ids]),
        num_beams=k,
        num_return_sequences=k,
        do_sample=False,
        max_new_tokens=new,
        eos_token_id=stops,
        pad_token_id=0,
        early_stopping="never",
        length_penalty=length_penalty,
        output_scores=True,
        return_dict_in_generate=True,
    )
    seqs = []
    for s in out.sequences.tolist():
        end = next((i for i in range(len(ids), len(s)) if s[i] in stops), len(s))
        seqs.append(s[:end])
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize(("k", "new", "length_penalty"), [(4, 10, 1.0), (2, 12, 0.5), (6, 8, 2.0)])
def test_beams_equal_hugging_face(pipe, hf_model, k, new, length_penalty):
    gen = pipe.generator
    stopped = 0
    for text in PROMPTS:
        ids = pipe.encode(text)
        # The tokenizer's stop ids, then a token this model does emit (its third greedy
        # token), so hypotheses also finish early and the search can end before the limit.
        greedy = gen.generate([ids], make_params(top_k=1), max_new_tokens=4)[0][0]
        for stops in (gen.stop_ids, [greedy[len(ids) + 2]]):
            saved, gen.stop_ids = gen.stop_ids, stops
            try:
                hyps = beam_search(
                    gen, ids, num_beams=k, limit=len(ids) + new, length_penalty=length_penalty
                )
            finally:
                gen.stop_ids = saved
            seqs, scores = _hf_beams(hf_model, ids, stops, k, new, length_penalty)
            assert [h.ids for h in hyps] == seqs, (text, stops)
            assert [h.score for h in hyps] == pytest.approx(scores, abs=1e-4)
            stopped += sum(len(h.ids) < len(ids) + new for h in hyps)
    assert stopped > 0  # some hypotheses ended on a stop token


def test_fast_decoder_and_model_forward_find_the_same_beams(pipe):
    gen = pipe.generator
    assert gen.uses_fast_path()
    ids = pipe.encode(PROMPTS[0])
    fast = beam_search(gen, ids, num_beams=4, limit=len(ids) + 10)
    gen.fast = False  # the model's own forward with a KVCache
    try:
        ref = beam_search(gen, ids, num_beams=4, limit=len(ids) + 10)
    finally:
        gen.fast = True
    assert [h.ids for h in fast] == [h.ids for h in ref]
    assert [h.score for h in fast] == pytest.approx([h.score for h in ref], abs=1e-5)


def test_one_beam_is_greedy_decoding(pipe):
    gen = pipe.generator
    for text in PROMPTS:
        ids = pipe.encode(text)
        greedy = gen.generate([ids], make_params(top_k=1), max_new_tokens=9)[0][0]
        (hyp,) = beam_search(gen, ids, num_beams=1, limit=len(ids) + 9)
        assert hyp.ids == greedy


def test_pipeline_options_and_errors(pipe):
    one = pipe("北京", num_beams=3, max_new_tokens=6)
    three = pipe("北京", num_beams=3, num_return_sequences=3, max_new_tokens=6)
    assert one == three[0] and set(one) == {"text", "score"}
    assert [b["score"] for b in three] == sorted((b["score"] for b in three), reverse=True)
    assert pipe(["北京", "上海"], num_beams=3, max_new_tokens=6)[0] == one
    assert pipe("北京", num_beams=2, top_k=1, max_new_tokens=6)["text"]  # top_k=1 samples nothing
    for kw, match in [
        ({"num_beams": 2, "top_p": 0.5}, "leave top_p unset"),
        ({"num_beams": 2, "temperature": 0.7, "repetition_penalty": 1.2}, "temperature, rep"),
        ({"num_beams": 2, "num_return_sequences": 3}, "at most num_beams"),
        ({"num_beams": 0}, "num_beams must be >= 1"),
        ({"length_penalty": 2.0}, "give num_beams > 1"),
        ({"num_beams": 2, "length_penalty": float("nan")}, "finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipe("北京", max_new_tokens=3, **kw)


def test_cli_prints_beams_and_refuses_sampling_flags(tiny_model_dir, capsys):
    from megagpt.cli import main

    args = ["generate", "--model", tiny_model_dir, "--prompt", "北京", "--max-new-tokens", "6"]
    assert main([*args, "--num-beams", "3", "--num-return-sequences", "2", "--jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["score"] >= rows[1]["score"]
    assert rows[0]["text"] == rows[0]["prompt"] + rows[0]["text"][len("北京") :]
    for extra, match in [
        (["--num-beams", "2", "--top-p", "0.5"], "leave --top-p unset"),
        (["--num-beams", "2", "--stream"], "--stream with --num-beams"),
        (["--num-beams", "2", "--num-return-sequences", "3"], "at most --num-beams"),
    ]:
        assert main([*args, *extra]) == 2
        assert match in capsys.readouterr().err
