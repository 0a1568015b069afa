"""The fast decoding path (megagpt/inference/decode.py): the reference loop's tokens and Hugging
Face's, for one prompt, ragged batches, stop tokens and seeded sampling; weight packs that follow
the model's parameters."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch

from megagpt.inference.decode import DecodeWeights, FastDecoder, prepack_available
from megagpt.inference.generate import TextGenerator
from megagpt.inference.sampling import make_params

GREEDY = make_params(top_k=1)
SAMPLED = make_params(top_p=0.9, temperature=1.3)
PENALISED = make_params(top_k=1, repetition_penalty=2.0)
PROMPTS = ["中华人民共和国", "床前明月光，疑是地上霜。", "北京", "举头望明月，低头思故乡"]


@pytest.fixture(scope="module")
def gen(pipe):
    return pipe.generator


@pytest.fixture(scope="module")
def ids(pipe):
    out = [pipe.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in out}) > 2  # ragged
    return out


def twin(gen, model=None, **kw) -> TextGenerator:
    """Another generator (over the same model unless given) with other loop options."""
    kw.setdefault("stop_ids", [])
    return TextGenerator(
        model or gen.model,
        vocab_size=gen.vocab_size,
        max_positions=gen.max_positions,
        pad_id=gen.pad_id,
        **kw,
    )


def test_the_pipeline_decodes_with_the_fast_path(gen):
    assert gen.uses_fast_path(True) and not gen.uses_fast_path(False)
    assert not twin(gen, static=True).uses_fast_path(True)


@pytest.mark.parametrize("prepack", [False, True], ids=["plain", "prepacked"])
@pytest.mark.parametrize(
    "params", [GREEDY, SAMPLED, PENALISED], ids=["greedy", "sampled", "penalised"]
)
def test_fast_path_gives_the_reference_tokens(gen, ids, params, prepack):
    if prepack and not prepack_available(gen.model.word.word_embeddings.weight):
        pytest.skip("oneDNN prepacked linear not available")
    fast, ref = twin(gen, prepack=prepack), twin(gen, fast=False)
    # batch 1, then a ragged batch (one prefill, per-row positions)
    for batch in ([ids[1]], ids):
        assert fast.generate(batch, params, max_new_tokens=14, seed=3) == ref.generate(
            batch, params, max_new_tokens=14, seed=3
        )


def test_ragged_batch_equals_one_at_a_time_with_stop_tokens(gen, ids):
    free = twin(gen)
    first = free.generate(ids, GREEDY, max_new_tokens=12)
    stops = [first[0][0][len(ids[0]) + 2], first[2][0][len(ids[2]) + 4]]
    stopping = twin(gen, stop_ids=stops)
    batch = stopping.generate(ids, GREEDY, max_new_tokens=12)
    assert batch == [stopping.generate([p], GREEDY, max_new_tokens=12)[0] for p in ids]
    assert batch == twin(gen, stop_ids=stops, fast=False).generate(ids, GREEDY, max_new_tokens=12)
    assert len(batch[0][0]) < len(ids[0]) + 12  # the stop really cut a row


def test_seeded_sample_does_not_depend_on_batch_companions(gen, ids):
    fast = twin(gen)
    alone = fast.generate([ids[2]], SAMPLED, max_new_tokens=10, seed=11)[0]
    crowd = fast.generate([ids[0], ids[2], ids[3]], SAMPLED, max_new_tokens=10, seed=11)[1]
    assert alone == crowd
    assert alone != fast.generate([ids[2]], SAMPLED, max_new_tokens=10, seed=12)[0]


def test_row_limits_differ_in_a_ragged_batch(gen, ids):
    """max_length counts the prompt: rows stop at different steps; nothing past a row's limit."""
    fast, ref = twin(gen), twin(gen, fast=False)
    limit = max(len(p) for p in ids) + 3
    out = fast.generate(ids, GREEDY, max_length=limit)
    assert [len(r[0]) for r in out] == [limit] * len(ids)
    assert out == ref.generate(ids, GREEDY, max_length=limit)


def _load_bench():
    path = Path(__file__).resolve().parents[3] / "bench" / "generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def test_greedy_tokens_equal_hugging_face_generate(gen, ids, tiny_model_dir):
    hf = _load_bench().to_gpt2(tiny_model_dir)
    fast = twin(gen)
    # one prompt; a batch of 3 (of equal length: HF would need left padding)
    for batch in ([ids[0]], [ids[1]], [p[:7] for p in (ids[0], ids[1], ids[3])]):
        x = torch.tensor(batch)
        theirs = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=16,
            min_new_tokens=16,
            eos_token_id=None,
            pad_token_id=0,
        ).tolist()
        assert [r[0] for r in fast.generate(batch, GREEDY, max_new_tokens=16)] == theirs


@contextlib.contextmanager
def _restored(model):
    """The model's weights are put back afterwards (these tests change them)."""
    saved = [p.detach().clone() for p in model.parameters()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, v in zip(model.parameters(), saved):
                p.copy_(v.to(p.dtype))
        model.eval()


@pytest.mark.parametrize("how", ["optimizer", "data"])
def test_packed_weights_follow_a_training_step(gen, ids, how):
    """A fine-tuning loop that samples between optimizer steps must decode with the current
    weights: a torch optimizer updates parameters in place (version counter), DeepSpeed's bf16
    path through ``.data`` (no version counter)."""
    with _restored(gen.model) as model:
        fast = twin(gen)
        before = fast.generate([ids[1]], GREEDY, max_new_tokens=10)
        if how == "optimizer":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=50.0)
            loss = model(torch.tensor([ids[1]])).float().logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                gen_ = torch.Generator().manual_seed(0)
                for layer in model.layers:
                    for w in (
                        layer.attention.query_key_value.weight,
                        layer.mlp.dense_h_to_4h.weight,
                        layer.mlp.dense_4h_to_h.weight,
                    ):
                        w.data.copy_(torch.randn(w.shape, generator=gen_) * 0.5)
        after = fast.generate([ids[1]], GREEDY, max_new_tokens=10)
        assert after == twin(gen, fast=False).generate([ids[1]], GREEDY, max_new_tokens=10)
        assert after != before
    assert fast.generate([ids[1]], GREEDY, max_new_tokens=10) == before  # restored weights


def test_packs_are_reused_while_the_weights_do_not_change(gen, ids, monkeypatch):
    from megagpt.inference import decode

    if not prepack_available(gen.model.word.word_embeddings.weight):
        pytest.skip("oneDNN prepacked linear not available")
    calls = []
    real, real_kernel = decode._pack, decode.cpu_kernels.pack
    monkeypatch.setattr(decode, "_pack", lambda w, rows: calls.append(rows) or real(w, rows))
    monkeypatch.setattr(decode.cpu_kernels, "pack", lambda w: calls.append(0) or real_kernel(w))
    fast = twin(gen, prepack=True)
    fast.generate([ids[0]], GREEDY, max_new_tokens=4)
    built = len(calls)
    fast.generate([ids[1]], GREEDY, max_new_tokens=4)
    assert built > 0 and len(calls) == built


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_one_row_steps_read_the_layout_measured_fastest_for_the_cpu(gen, ids, monkeypatch, vendor):
    """One-row passes (where our kernel is not built): [in, out] copies for QKV, attention
    output and fc1 and oneDNN packs for fc2 and the output layer on an AMD CPU, copies for
    every linear on an Intel one; both give the reference loop's tokens."""
    from megagpt.inference import decode
    from megagpt.model import cpu_kernels

    if not prepack_available(gen.model.word.word_embeddings.weight):
        pytest.skip("oneDNN prepacked linear not available")
    monkeypatch.setattr(decode, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    fast = twin(gen, prepack=True)
    weights = fast.decoder().weights
    weights.refresh()
    layers, head = weights.layers(1)
    packed = [
        [p.is_mkldnn for p in (lw.qkv_p, lw.dense_p, lw.fc1_p, lw.fc2_p)] for lw in layers
    ] + [[head.is_mkldnn]]
    intel = vendor == "GenuineIntel"
    assert packed == [[False, False, False, not intel]] * len(layers) + [[not intel]]
    ref = twin(gen, fast=False)
    assert fast.generate([ids[1]], GREEDY, max_new_tokens=12) == ref.generate(
        [ids[1]], GREEDY, max_new_tokens=12
    )


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_passes_of_few_rows_take_the_weights_measured_fastest_for_the_cpu(
    gen, ids, monkeypatch, vendor
):
    """Where our kernel is not built: 2-3 rows through the one-row set (2 rows) or the 8-row
    packs (3) on an AMD CPU; the model's own weights through F.linear on an Intel one. Every
    class gives the reference loop's tokens, with the passes of each size (2 and 3 prompts,
    then one row checking 3 guesses) run."""
    from megagpt.inference import decode
    from megagpt.model import cpu_kernels

    if not prepack_available(gen.model.word.word_embeddings.weight):
        pytest.skip("oneDNN prepacked linear not available")
    monkeypatch.setattr(decode, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    intel = vendor == "GenuineIntel"
    assert [decode.row_class(r) for r in (1, 2, 3, 4, 8, 64)] == (
        [1, 0, 0, 8, 8, 8] if intel else [1, 1, 8, 8, 8, 8]
    )
    fast = twin(gen, prepack=True)
    weights = fast.decoder().weights
    weights.refresh()
    layers, head = weights.layers(3)
    assert (head is None) == intel and (layers[0].fc2_p is None) == intel
    seen = []
    real = decode.DecodeWeights.layers
    monkeypatch.setattr(
        decode.DecodeWeights, "layers", lambda self, rows: seen.append(rows) or real(self, rows)
    )
    ref = twin(gen, fast=False)
    for batch in (ids[:2], ids[:3], [ids[0]]):
        want = ref.generate(batch, GREEDY, max_new_tokens=12)
        assert fast.generate(batch, GREEDY, max_new_tokens=12) == want
    assert {decode.row_class(r) for r in seen} >= {0 if intel else 1, 8}


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_passes_up_to_64_rows_take_our_kernel_on_intel(gen, ids, monkeypatch, vendor):
    """On an Intel CPU where it builds, every pass of 1-64 rows multiplies through our kernel
    (one copy of the weights for all of them), larger ones through the 8-row oneDNN packs; an
    AMD CPU keeps its measured choice. The kernel's passes (one prompt, a ragged batch,
    speculation's checks) give the reference loop's tokens."""
    from megagpt.inference import decode
    from megagpt.model import cpu_kernels

    if not prepack_available(gen.model.word.word_embeddings.weight) or not cpu_kernels.available():
        pytest.skip("oneDNN or our CPU kernels not available")
    monkeypatch.setattr(decode, "cpu_vendor", lambda: vendor)
    intel = vendor == "GenuineIntel"
    k = decode.KERNEL
    assert [decode.row_class(r) for r in (1, 2, 3, 4, 8, 64, 65)] == (
        [k, k, k, k, k, k, 8] if intel else [1, 1, 8, 8, 8, 8, 8]
    )
    if not intel:
        return
    fast = twin(gen, prepack=True)
    weights = fast.decoder().weights
    weights.refresh()
    layers, head = weights.layers(5)
    assert all(
        isinstance(p, cpu_kernels.RowPack)
        for lw in layers
        for p in (lw.qkv_p, lw.dense_p, lw.fc1_p, lw.fc2_p, head)
    )
    calls = []
    real = cpu_kernels.linear
    monkeypatch.setattr(
        cpu_kernels, "linear", lambda x, *a, **kw: calls.append(len(x)) or real(x, *a, **kw)
    )
    attended = []
    real_attend = cpu_kernels.attend
    monkeypatch.setattr(
        cpu_kernels, "attend", lambda qkv, *a: attended.append(len(qkv)) or real_attend(qkv, *a)
    )
    ref = twin(gen, fast=False)
    for batch in ([ids[1]], ids, [ids[0] * 3]):  # the last one speculates
        want = ref.generate(batch, GREEDY, max_new_tokens=12)
        assert fast.generate(batch, GREEDY, max_new_tokens=12) == want
    assert calls and max(calls) > 1
    # the passes' attention (head size 16), checks of several guesses per row among them
    assert attended and max(attended) > len(ids)


def test_prepack_refused_where_unavailable(gen):
    with _restored(gen.model) as model:
        model.to(torch.float16)
        with pytest.raises(ValueError, match="prepack=True needs oneDNN"):
            FastDecoder(model, prepack=True)
        assert FastDecoder(model).weights.prepack is False
        model.to(torch.float32)
    assert isinstance(FastDecoder(gen.model).weights, DecodeWeights)


@pytest.mark.parametrize("speculate", [0, 7], ids=["plain", "speculative"])
def test_fast_cache_is_allocated_once_and_written_in_place(gen, ids, monkeypatch, speculate):
    made = []
    real = FastDecoder.new_cache

    def spy(self, *a, **kw):
        made.append(real(self, *a, **kw))
        return made[-1]

    monkeypatch.setattr(FastDecoder, "new_cache", spy)
    fast = twin(gen, speculate=speculate)
    pointers = set()
    for _ in fast.steps(ids, GREEDY, [len(p) + 12 for p in ids]):
        pointers.add(tuple(k.data_ptr() for k in made[0].keys))
    (cache,) = made
    # speculation: room for one pass of guesses past the longest row's limit
    spare = speculate
    assert cache.max_length == max(len(p) for p in ids) + 12 + spare
    assert len(pointers) == 1
    if speculate:  # rows that finish leave: at most one copy of the live rows per finished row
        kept = []
        real_keep = FastDecoder.keep_rows
        monkeypatch.setattr(
            FastDecoder, "keep_rows", staticmethod(lambda c, r: kept.append(r) or real_keep(c, r))
        )
        list(fast.steps(ids, GREEDY, [len(p) + n for p, n in zip(ids, (3, 12, 7, 12))]))
        assert 1 <= len(kept) <= len(ids) - 1


def test_a_ragged_prefill_runs_the_linears_on_real_tokens_only(gen, ids, monkeypatch):
    """Prompts of different lengths in one prefill: every linear sees the sum of the lengths in
    rows, not batch x longest; each row's logits equal its own prefill's."""
    dec = gen.decoder()
    rows_seen: list[int] = []
    real = FastDecoder._linear

    def spy(x, *a, **kw):
        rows_seen.append(x.shape[0])
        return real(x, *a, **kw)

    lengths = [len(p) for p in ids]
    tokens = torch.zeros(len(ids), max(lengths), dtype=torch.long)
    for i, p in enumerate(ids):
        tokens[i, : len(p)] = torch.tensor(p)
    dec.begin()
    monkeypatch.setattr(FastDecoder, "_linear", staticmethod(spy))
    cache = dec.new_cache(len(ids), max(lengths), zeroed=True)
    together = dec.prefill(tokens, torch.tensor(lengths), cache)
    layer_rows = rows_seen[:-1]  # the last call is the output layer, one row per prompt
    assert set(layer_rows) == {sum(lengths)} and rows_seen[-1] == len(ids)
    for i, p in enumerate(ids):
        alone = dec.prefill(torch.tensor([p]), None, dec.new_cache(1, len(p)))
        torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-4)


def test_a_ragged_check_feeds_each_row_its_own_tokens_only(gen, ids, monkeypatch):
    """verify with counts: the linears see sum(counts) rows, not batch x width, and each fed
    token's logits equal the padded check's at the same place (the padding's keys and values
    land past every fed slot)."""
    dec = gen.decoder()
    lengths = [len(p) for p in ids]
    b, width = len(ids), 4
    tokens = torch.zeros(b, max(lengths), dtype=torch.long)
    for i, p in enumerate(ids):
        tokens[i, : len(p)] = torch.tensor(p)
    fed = torch.tensor([[p[-1], *(p * width)[:width]] for p in ids])  # [b, 1 + width]
    counts = torch.tensor([5, 1, 3, 2])
    start = torch.tensor(lengths) - 1
    span = max(lengths) + width

    def check(ragged: bool) -> torch.Tensor:
        dec.begin()
        cache = dec.new_cache(b, span + 1, zeroed=True)
        dec.prefill(tokens, torch.tensor(lengths), cache)
        return dec.verify(
            fed, start, cache, span=span, max_position=10_000, counts=counts if ragged else None
        )

    padded = check(False)  # [b * 5, V]
    rows_seen: list[int] = []
    real = FastDecoder._linear

    def spy(x, *a, **kw):
        rows_seen.append(x.shape[0])
        return real(x, *a, **kw)

    monkeypatch.setattr(FastDecoder, "_linear", staticmethod(spy))
    ragged = check(True)
    n = int(counts.sum())
    assert ragged.shape == (n, padded.shape[1])
    assert rows_seen[-1] == n and n in rows_seen[:-1]  # the check's layers and output layer
    real_places = [r * (1 + width) + j for r, c in enumerate(counts.tolist()) for j in range(c)]
    torch.testing.assert_close(ragged, padded[real_places], rtol=1e-4, atol=1e-4)
    cache = dec.new_cache(b, span + 1, zeroed=True)
    for bad in ([5, 1, 0, 2], [5, 1, 6, 2], [5, 1, 3]):
        with pytest.raises(ValueError, match=r"counts must give 1\.\.5 fed tokens"):
            dec.verify(fed, start, cache, span=span, max_position=10_000, counts=torch.tensor(bad))
