"""The decoding loop's fast path: a KV cache allocated once, static decode steps (what
torch.compile / CUDA graphs capture) giving the default path's tokens, the repetition penalty's
incremental presence mask, and batched stop checks."""

from __future__ import annotations

import pytest
import torch

from megagpt.inference import generate as generate_mod
from megagpt.inference.generate import TextGenerator
from megagpt.inference.sampling import apply_repetition_penalty, make_params
from megagpt.model import KVCache

GREEDY = make_params(top_k=1)
SAMPLED = make_params(top_p=0.9, temperature=1.3)
PROMPTS = ["中华人民共和国", "床前明月光，疑是地上霜。", "北京"]


@pytest.fixture(scope="module")
def gen(pipe):
    return pipe.generator


@pytest.fixture(scope="module")
def ids(pipe):
    return [pipe.tokenizer.encode(p) for p in PROMPTS]


def twin(gen, **kw) -> TextGenerator:
    """Another generator over the same model with other loop options."""
    return TextGenerator(
        gen.model,
        vocab_size=gen.vocab_size,
        max_positions=gen.max_positions,
        stop_ids=gen.stop_ids,
        pad_id=gen.pad_id,
        **kw,
    )


def test_kv_cache_is_allocated_once_for_the_longest_row(gen, ids, monkeypatch):
    made: list[KVCache] = []
    pointers: set[tuple[int, int]] = set()

    class Spy(KVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)
            self.allocations = 0

        def _allocate(self, layer, k):
            self.allocations += 1
            super()._allocate(layer, k)

        def update(self, layer, k, v):
            out = super().update(layer, k, v)
            pointers.add((layer, self.keys[layer].data_ptr()))
            return out

    monkeypatch.setattr(generate_mod, "KVCache", Spy)
    twin(gen, fast=False).generate(ids, GREEDY, max_new_tokens=12)  # the reference loop
    (cache,) = made
    longest = max(len(p) for p in ids) + 12
    assert cache.allocations == gen.num_layers  # once per layer, never regrown
    assert {k.shape[2] for k in cache.keys} == {longest}
    assert len(pointers) == gen.num_layers  # every step wrote into the same buffers


def _cat_calls(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::cat")


def test_no_concatenation_per_token(gen, ids):
    """The old cache grew by torch.cat twice per layer and token; the cost of a step must not
    depend on how many steps came before."""
    short = _cat_calls(lambda: gen.generate([ids[0]], GREEDY, max_new_tokens=4))
    long = _cat_calls(lambda: gen.generate([ids[0]], GREEDY, max_new_tokens=20))
    assert long == short


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_static_decode_steps_give_the_default_tokens(gen, ids, params):
    static = twin(gen, static=True)
    assert static.generate(ids, params, max_new_tokens=16, seed=4) == gen.generate(
        ids, params, max_new_tokens=16, seed=4
    )


def test_static_decode_step_compiles_to_one_graph(gen, ids):
    """torch.compile captures the whole static step (fullgraph: no graph break) and reuses it at
    every position (a recompile is an error here). The "eager" backend checks the capture
    without a C++ toolchain; on CUDA, ``compile=True`` uses inductor with CUDA graphs."""
    import torch._dynamo

    static = twin(gen, static=True)
    static._compiled = torch.compile(
        static._decode_static, backend="eager", fullgraph=True, dynamic=False
    )
    static.compile = True
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = static.generate(ids[:2], GREEDY, max_new_tokens=10)
    finally:
        torch._dynamo.reset()
    assert out == gen.generate(ids[:2], GREEDY, max_new_tokens=10)


def test_compile_with_tensor_parallel_is_refused(gen):
    with pytest.raises(ValueError, match="tensor-parallel size 1"):
        TextGenerator(
            gen.model,
            vocab_size=gen.vocab_size,
            max_positions=gen.max_positions,
            stop_ids=[],
            compile=True,
            tp_size=2,
        )


@torch.no_grad()
def _penalised_reference(gen, prompt: list[int], penalty: float, n: int) -> list[int]:
    """Greedy decoding by definition: the whole prefix every step, the penalty recomputed from
    the sequence so far (apply_repetition_penalty), no cache, no stop tokens."""
    seq = list(prompt)
    for _ in range(n):
        logits = gen.model(torch.tensor([seq]))[-1].float()[:, : gen.vocab_size]
        logits = apply_repetition_penalty(logits, torch.tensor([seq]), penalty)
        seq.append(int(logits.argmax(-1)))
    return seq


def test_repetition_penalty_presence_mask_matches_the_definition(gen, ids):
    params = make_params(top_k=1, repetition_penalty=3.0)
    free = twin(gen)
    free.stop_ids = []
    batched = free.generate(ids, params, max_new_tokens=12)
    for p, out in zip(ids, batched):
        assert out[0] == _penalised_reference(gen, p, 3.0, 12)


def test_batched_stop_checks_give_the_same_tokens(gen, ids):
    """Checking "all rows done?" every 8 steps runs a few steps past the last stop; those steps
    must change nothing."""
    free = twin(gen)
    free.stop_ids = []
    first = free.generate(ids, GREEDY, max_new_tokens=16)
    stops = [first[0][0][len(ids[0]) + 2], first[1][0][len(ids[1]) + 3]]  # rows stop early
    every_step = twin(gen, check_every=1)
    every_8 = twin(gen, check_every=8)
    every_step.stop_ids = every_8.stop_ids = stops
    for params in (GREEDY, SAMPLED):
        a = every_step.generate(ids, params, max_new_tokens=16, seed=2)
        assert a == every_8.generate(ids, params, max_new_tokens=16, seed=2)
    assert len(a[0][0]) < len(ids[0]) + 16  # the stop really cut the row
