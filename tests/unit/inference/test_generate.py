"""Decoding on a tiny real model: KV cache, batching, limits, stop rules, the pipeline API."""

from __future__ import annotations

import pytest

from megagpt.inference.sampling import make_params

GREEDY = make_params(top_k=1)
SAMPLED = make_params(top_p=0.9, temperature=1.3)
PROMPTS = ["中华人民共和国", "床前明月光，疑是地上霜。", "北京", "第一条　为了保护公民的合法权益"]


@pytest.fixture(scope="module")
def gen(pipe):
    return pipe.generator


@pytest.fixture(scope="module")
def ids(pipe):
    return [pipe.tokenizer.encode(p) for p in PROMPTS]


def test_greedy_with_kv_cache_equals_without(gen, ids):
    for p in ids:
        with_cache = gen.generate([p], GREEDY, max_new_tokens=20)
        without = gen.generate([p], GREEDY, max_new_tokens=20, use_cache=False)
        assert with_cache == without
        assert len(with_cache[0][0]) > len(p), "the model must generate something"


def test_batched_prompts_equal_one_by_one(gen, ids):
    assert len({len(p) for p in ids}) > 1, "the prompts must differ in length"
    for params in (GREEDY, SAMPLED):
        batched = gen.generate(ids, params, max_new_tokens=15, seed=3)
        alone = [gen.generate([p], params, max_new_tokens=15, seed=3)[0] for p in ids]
        assert batched == alone


def test_seeded_sampling_is_reproducible(gen, ids):
    a = gen.generate(ids[:2], SAMPLED, max_new_tokens=20, seed=11)
    b = gen.generate(ids[:2], SAMPLED, max_new_tokens=20, seed=11)
    c = gen.generate(ids[:2], SAMPLED, max_new_tokens=20, seed=12)
    assert a == b
    assert a != c


def test_max_length_counts_the_prompt_and_is_capped(gen, ids):
    p = ids[1]
    out = gen.generate([p], GREEDY, max_length=len(p) + 5)[0][0]
    assert len(out) <= len(p) + 5 and out[: len(p)] == p
    # The default (prompt + 100) is capped at the model's 64 positions.
    assert gen.limits([len(p)]) == [64]
    assert gen.limits([10], max_length=30) == [30]
    with pytest.raises(ValueError, match="counts the prompt"):
        gen.generate([p], GREEDY, max_length=len(p))
    with pytest.raises(ValueError, match="positions"):
        gen.generate([list(range(5, 69))], GREEDY)


def test_stop_tokens_end_a_row_and_are_not_returned(gen, ids):
    stops = gen.stop_ids
    try:
        gen.stop_ids = []
        free = gen.generate([ids[0]], GREEDY, max_new_tokens=12)[0][0]
        new = free[len(ids[0]) :]
        gen.stop_ids = [new[4]]
        cut = gen.generate([ids[0]], GREEDY, max_new_tokens=12)[0][0]
    finally:
        gen.stop_ids = stops
    assert cut == free[: len(ids[0]) + new.index(new[4])]


def test_pipeline_stops_at_end_of_document_and_sep(pipe):
    tok = pipe.tokenizer
    assert sorted(pipe.generator.stop_ids) == sorted([tok.eod, tok.sep])


def test_pipeline_output_format(pipe):
    one = pipe(PROMPTS[0], top_k=1, max_new_tokens=8)
    assert set(one) == {"text"} and one["text"].startswith(PROMPTS[0])
    many = pipe(PROMPTS[:2], top_k=1, max_new_tokens=8)
    assert many[0] == one and many[1]["text"].startswith(PROMPTS[1])
    copies = pipe(PROMPTS[0], num_return_sequences=3, max_new_tokens=8, seed=5, temperature=1.5)
    assert len(copies) == 3 and len({c["text"] for c in copies}) > 1
    assert pipe(PROMPTS[0], max_new_tokens=8, seed=5) == pipe(PROMPTS[0], max_new_tokens=8, seed=5)


def test_stream_grows_to_the_full_result(pipe):
    parts = list(pipe.stream(PROMPTS[2], top_k=1, max_new_tokens=10))
    assert len(parts) >= 2
    assert all(p["text"].startswith(PROMPTS[2]) for p in parts)
    assert parts[-1] == pipe(PROMPTS[2], top_k=1, max_new_tokens=10)


def test_repetition_penalty_changes_greedy_output(gen, ids):
    plain = gen.generate([ids[2]], GREEDY, max_new_tokens=30)
    penalised = gen.generate(
        [ids[2]], make_params(top_k=1, repetition_penalty=5.0), max_new_tokens=30
    )
    assert plain != penalised
    new = penalised[0][0][len(ids[2]) :]
    assert len(set(new)) >= len(set(plain[0][0][len(ids[2]) :]))


def test_empty_prompt_starts_a_document(pipe, gen):
    """An empty prompt decodes from the end-of-document token, as a document starts in
    pretraining; the text is what follows it."""
    # Top-10 sampling, seeded: the tiny model's greedy choice after a document start is to
    # end the document, which would leave nothing to compare.
    eod, top10 = pipe.tokenizer.eod, make_params(top_k=10)
    out = pipe("", top_k=10, max_new_tokens=8, seed=3)
    from_eod = gen.generate([[eod]], top10, max_new_tokens=8, seed=3)[0][0]
    assert from_eod[0] == eod and len(from_eod) > 2
    assert out["text"] == pipe.tokenizer.decode(from_eod[1:])
    # Not vacuous: another start token continues differently.
    other = gen.generate([[eod + 1]], top10, max_new_tokens=8, seed=3)[0][0]
    assert pipe.tokenizer.decode(other[1:]) != out["text"]


def test_unknown_task_is_an_error(tiny_model_dir):
    from megagpt import pipeline

    with pytest.raises(ValueError, match="text-generation"):
        pipeline("summarization", model=tiny_model_dir)
