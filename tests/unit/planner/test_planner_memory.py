"""The planner's memory accounting against hand-computed cases."""

from __future__ import annotations

import dataclasses

import pytest

from megagpt.config import from_name, parameter_count
from megagpt.planner.memory import (
    CUDA_RESERVE_BYTES,
    LOSS_CHUNK_ELEMENTS,
    Layout,
    activation_bytes_per_layer,
    in_flight,
    layer_params_per_rank,
    FUSED_MIN_ROWS,
    logits_bytes,
    memory_per_stage,
    model_state,
    optimizer_wrapper,
    padded_vocab_size,
    stage_parameters,
)

TINY = from_name("gpt3-tiny")  # 4 layers, h=64, 4 heads, vocab 1024, 64 positions
M175 = from_name("gpt3-175b")


def test_padded_vocab_matches_the_model():
    from megagpt.model.gpt import padded_vocab_size as model_rule

    for vocab in (1024, 25600, 25601, 50257):
        for tp in (1, 2, 4, 8):
            assert padded_vocab_size(vocab, tp) == model_rule(vocab, tp)


def test_layer_parameters_by_hand():
    # h=64, ffn=256: QKV 3*64*64 + 192, out 64*64 (+64 replicated), MLP 64*256 + 256 and
    # 256*64 (+64 replicated), two LayerNorms 4*64.
    split = 3 * 64 * 64 + 192 + 64 * 64 + 64 * 256 + 256 + 256 * 64
    replicated = 4 * 64 + 64 + 64
    assert layer_params_per_rank(TINY, 1) == split + replicated
    assert layer_params_per_rank(TINY, 2) == split // 2 + replicated


def test_stages_add_up_to_the_parameter_count():
    for m in (TINY, M175):
        (only,) = stage_parameters(m, 1, 1)
        assert only.params == parameter_count(m)  # vocab 1024 / 25600 needs no padding at TP1
        stages = stage_parameters(m, 1, 4)
        # PP > 1: the last stage holds a second copy of the tied word embedding.
        assert sum(s.params for s in stages) == parameter_count(m) + m.vocab_size * m.hidden_size
        assert [len(s.layers) for s in stages] == [m.num_layers // 4] * 4


def test_activations_reduce_to_korthikanti_formulas():
    # bf16 activations, dropout on, ffn = 4h: Korthikanti et al. 2022 eq. 1-3 and table 2.
    m = dataclasses.replace(M175, dropout=0.1, attention_dropout=0.1)
    s, b, h, a = 2048, 1, 12288, 96
    sbh, as2b = s * b * h, a * s * s * b

    def act(tp, sp, rc, flash=False):
        return activation_bytes_per_layer(
            m, s, b, tp, sp=sp, recompute=rc, act_bytes=2, flash=flash
        )

    assert act(1, False, "none") == pytest.approx(sbh * 34 + 5 * as2b)
    assert act(8, False, "none") == pytest.approx(sbh * (10 + 24 / 8) + 5 * as2b / 8)
    assert act(8, True, "none") == pytest.approx(sbh * 34 / 8 + 5 * as2b / 8)
    assert act(8, True, "selective") == pytest.approx(sbh * 34 / 8)
    assert act(8, False, "selective") == pytest.approx(sbh * (10 + 24 / 8))
    assert act(8, False, "full") == pytest.approx(2 * sbh)
    assert act(8, True, "full") == pytest.approx(2 * sbh / 8)
    assert act(8, True, "none", flash=True) == pytest.approx(sbh * 34 / 8)
    # Without dropout the masks (and the attention dropout output) are not kept.
    m0 = dataclasses.replace(m, dropout=0.0, attention_dropout=0.0)
    assert activation_bytes_per_layer(
        m0, s, b, 1, sp=False, recompute="none", act_bytes=2, flash=False
    ) == pytest.approx(sbh * 32 + 2 * as2b)


def test_pipeline_in_flight_micro_batches():
    assert [in_flight(4, st, 16) for st in range(4)] == [4, 3, 2, 1]
    assert [in_flight(4, st, 2) for st in range(4)] == [2, 2, 2, 1]
    assert in_flight(1, 0, 64) == 1


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_model_state_per_zero_stage(zero):
    # gpt3-175b, TP8 PP8 DP16, bf16, what DeepSpeed 0.19 allocates per optimizer wrapper:
    # bf16 at ZeRO 0/1 runs BF16_Optimizer (flat bf16 weights and .grad, a full flat fp32
    # gradient accumulator, fp32 master + moments / DP); ZeRO 2 stage_1_and_2 (fp32 gradient
    # partition, two bf16 buckets); ZeRO 3 everything / DP and a 5e8-element fp32 bucket.
    lay = Layout(tp=8, pp=8, dp=16, micro_batch=1, zero_stage=zero)
    stages = memory_per_stage(M175, lay, precision="bf16", global_batch=3072, flash=True)
    n = stages[1].params
    assert n == 12 * layer_params_per_rank(M175, 8)
    b = stages[1]
    assert b.weights == 2 * n / (16 if zero >= 3 else 1)
    assert b.optimizer == 8 * n / 16
    grads = {0: 2 * n, 1: 2 * n, 2: 4 * n / 16, 3: 4 * n / 16}[zero]
    flat = {0: 4 * n / 16 + 4 * n, 1: 4 * n / 16 + 4 * n, 2: 4 * n / 16, 3: 4 * n / 16}[zero]
    assert (b.grads, b.flat) == (grads, flat)
    bucket = {0: 0, 1: 0, 2: 2 * 2 * 5e7, 3: 4 * 5e8}[zero]
    assert b.buffers == CUDA_RESERVE_BYTES + bucket


def test_optimizer_wrapper_follows_the_engine_rule():
    assert optimizer_wrapper("fp32", 3, 1) == "plain"  # DP=1: nothing to partition
    assert optimizer_wrapper("bf16", 0, 1) == "bf16"
    assert optimizer_wrapper("bf16", 0, 8) == "bf16"  # bf16 at ZeRO 0 runs stage 1
    assert optimizer_wrapper("fp32", 1, 8) == "zero12"
    assert optimizer_wrapper("bf16", 2, 8) == "zero12"
    assert optimizer_wrapper("fp32", 3, 2) == "zero3"
    assert optimizer_wrapper("fp16", 0, 2) == "fp16"


def test_zero_buckets_are_allocated_whole_whatever_the_model_size():
    # stage_1_and_2 allocates reduce_bucket_size elements per bucket and stage3 its default
    # 5e8, even for a model of 0.3M parameters (measured on CPU by tools/probe_memory.py).
    n = parameter_count(TINY)
    z1 = model_state("fp32", 1, n, 2, pipeline=False)
    z2 = model_state("fp32", 2, n, 2, pipeline=False)
    z3 = model_state("bf16", 3, n, 2, pipeline=False)
    assert (z1.buffers, z2.buffers, z3.buffers) == (4 * 5e7, 2 * 4 * 5e7, 4 * 5e8)
    # ZeRO 1 keeps a full fp32 .grad plus the averaged partition; ZeRO 2 only the partition.
    assert z1.grads - z2.grads == 4 * n


def test_zero1_under_the_pipeline_engine_holds_a_second_bucket():
    # stage_1_and_2.reduce_gradients(pipeline_parallel=True) appends a bucket of its own.
    n = parameter_count(TINY)
    alone = model_state("fp32", 1, n, 2, pipeline=False)
    piped = model_state("fp32", 1, n, 2, pipeline=True)
    assert piped.buffers - alone.buffers == 4 * 5e7
    # ZeRO 2 never runs under the pipeline engine; its buckets do not depend on it.
    assert model_state("bf16", 2, n, 2, pipeline=False).buffers == 2 * 2 * 5e7


def test_plain_path_is_the_same_with_data_parallel():
    # DeepSpeed's flattened all-reduce copies come after the backward, past the peak.
    n = parameter_count(TINY)
    assert model_state("fp32", 0, n, 1, pipeline=False) == model_state(
        "fp32", 0, n, 4, pipeline=False
    )


def test_pipeline_last_stage_keeps_the_last_loss_logits():
    lay = Layout(tp=1, pp=2, dp=1, micro_batch=2, zero_stage=1)
    first, last = memory_per_stage(TINY, lay, precision="fp32", global_batch=4, cuda=False)
    assert first.logits == 0 and first.workspace == 0
    assert last.logits == logits_bytes(TINY, 32, 2, 1, "fp32", cuda=False)
    assert last.workspace == 32 * 2 * 1024 * 4  # the fp32 logits the kept loss graph saved


def test_logits_at_the_loss_backward():
    # saved logits + their gradient in the training dtype, and one fp32 chunk of rows (two
    # for bf16: the upcast copy and the softmax); gpt3-tiny: 64 rows of 1024 fit one chunk.
    assert logits_bytes(TINY, 32, 2, 1, "fp32", cuda=False) == 64 * 1024 * (2 * 4 + 4)
    assert logits_bytes(TINY, 32, 2, 2, "bf16", cuda=False) == 64 * 512 * (2 * 2 + 2 * 4)
    # gpt3-175b on a GPU: 2048 rows of 25600/8, chunks of 2**25 elements hold them all.
    assert logits_bytes(M175, 2048, 1, 8, "bf16") == 2048 * 3200 * (2 * 2 + 2 * 4)
    # On CPU a chunk is 2**20 elements: 327 rows of 3200.
    assert (
        logits_bytes(M175, 2048, 1, 8, "bf16", cuda=False)
        == 2048 * 3200 * 2 * 2 + 327 * 3200 * 4 * 2
    )


def test_fused_output_layer_keeps_gradients_not_logits():
    # pipeline size 1: dh [rows, h] + dW [V/t, h] in the training dtype, one fp32 chunk
    # (gpt3-tiny: h 64; 64 rows fit one chunk of at least 256 rows)
    h = TINY.hidden_size
    assert (
        logits_bytes(TINY, 32, 2, 1, "fp32", cuda=False, fused=True)
        == (64 + 1024) * h * 4 + 64 * 1024 * 4
    )
    # bf16: the chunk's fp32 logits plus their bf16 copy and gradient; one chunk, no fp32 sum
    assert logits_bytes(TINY, 32, 2, 2, "bf16", cuda=False, fused=True) == (
        64 + 512
    ) * h * 2 + 64 * 512 * (4 + 2 * 2)
    # gpt3-175b on CPU at TP 8: 2048 rows in chunks of 1024 (the 16-bit minimum), so the
    # chunks' weight gradients are summed in an fp32 [3200, h] buffer
    h = M175.hidden_size
    assert (
        logits_bytes(M175, 2048, 1, 8, "bf16", cuda=False, fused=True)
        == (2048 + 3200) * h * 2 + 1024 * 3200 * 8 + 3200 * h * 4
    )
    lay = Layout(tp=1, pp=1, dp=1, micro_batch=2, zero_stage=0)
    (only,) = memory_per_stage(TINY, lay, precision="fp32", global_batch=2, cuda=False)
    assert only.logits == logits_bytes(TINY, 32, 2, 1, "fp32", cuda=False, fused=True)


def test_loss_chunk_matches_the_model():
    import torch

    from megagpt.model import fused

    assert fused._CHUNK_ELEMENTS == LOSS_CHUNK_ELEMENTS
    assert {torch.finfo(d).bits // 8: n for d, n in fused._MIN_FUSED_ROWS.items()} == {
        k: v for k, v in FUSED_MIN_ROWS.items() if k == 4
    }


def test_activation_total_of_a_stage_by_hand():
    # gpt3-175b TP8 PP8 SP bf16, flash: per layer 34*sbh/8 (dropout 0.1); stage 0 keeps
    # 8 micro-batches of its 12 layers plus 8 embedding outputs (2 B + 1 B mask, /8 under SP).
    lay = Layout(tp=8, pp=8, dp=16, micro_batch=1, zero_stage=1, sequence_parallel=True)
    st0 = memory_per_stage(M175, lay, precision="bf16", global_batch=3072)[0]
    sbh = 2048 * 12288
    assert st0.activations == pytest.approx(12 * 8 * 34 * sbh / 8 + 8 * 3 * sbh / 8)
    last = memory_per_stage(M175, lay, precision="bf16", global_batch=3072)[-1]
    assert last.logits == pytest.approx(2048 * 25600 / 8 * (2 * 2 + 2 * 4))
    assert last.activations == pytest.approx(12 * 1 * 34 * sbh / 8)


def test_fp32_counts_four_byte_weights_and_grads():
    n = parameter_count(TINY)
    lay = Layout(tp=1, pp=1, dp=2, micro_batch=1, zero_stage=1)
    (b,) = memory_per_stage(TINY, lay, precision="fp32", global_batch=8, cuda=False)
    # ZeRO 1 at DP=2: fp32 .grad and the averaged fp32 partition, master + moments sharded, one
    # whole fp32 bucket (on CPU too: the allocator holds all of it).
    assert (b.weights, b.grads, b.optimizer, b.flat, b.buffers) == (
        4 * n,
        4 * n + 4 * n / 2,
        8 * n / 2,
        4 * n / 2,
        4 * 5e7,
    )


def test_zero_at_data_parallel_size_1_is_stage_0():
    """DP=1 runs DeepSpeed stage 0 in fp32 (megagpt.engine.ds_config): torch's AdamW keeps two
    moments on the parameters themselves, no master copy, no bucket."""
    n = parameter_count(TINY)
    lay = Layout(tp=1, pp=1, dp=1, micro_batch=1, zero_stage=1)
    (b,) = memory_per_stage(TINY, lay, precision="fp32", global_batch=8, cuda=False)
    assert (b.weights, b.grads, b.optimizer, b.flat, b.buffers) == (4 * n, 4 * n, 8 * n, 0, 0)


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="train.precision"):
        memory_per_stage(TINY, Layout(1, 1, 1, 1), precision="fp8", global_batch=8)
