"""train.compile: the compiled decoder layers compute the eager function (dropout included)."""

from __future__ import annotations

import pytest
import torch

from megagpt.model.compile import compile_decoder_layers, compile_enabled
from megagpt.model.matmul import onednn_unavailable, use_onednn


def test_auto_compiles_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled("auto", cpu) and compile_enabled("auto", cuda)
    assert compile_enabled("always", cpu) and not compile_enabled("never", cuda)
    with pytest.raises(ValueError, match="train.compile"):
        compile_enabled("true", cpu)


def _tiny(recompute: str = "none"):
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config

    cfg = from_name("gpt3-tiny")
    cfg.num_layers, cfg.dropout, cfg.attention_dropout = 2, 0.2, 0.2
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()), recompute)
    initialize_weights(model, cfg, 5, 0, 1)
    return model.train(), cfg


def _loss_and_grads(model, tokens, labels, seed: int):
    torch.manual_seed(seed)
    model.dropout_rng.seed(seed, 0)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow  # one inductor compile of the layer (~30-90 s on a loaded 2-core CPU)
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_compiled_layers_equal_eager_with_dropout(recompute):
    """Same seeds: the same loss and gradients, residual dropout (default stream) and attention
    dropout (the forked TP-region stream, eager inside the compiled layer) included; the
    generator ends in the same state, so the next step draws the same masks too."""
    torch._dynamo.reset()
    eager, cfg = _tiny(recompute)
    compiled, _ = _tiny(recompute)  # the same seeded init
    assert compile_decoder_layers(compiled) == 2
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, 1)
    for seed in (11, 12):  # a second step: the compiled graph is reused, masks still equal
        le, ge = _loss_and_grads(eager, tokens, labels, seed)
        state_e = torch.get_rng_state()
        lc, gc = _loss_and_grads(compiled, tokens, labels, seed)
        assert torch.equal(torch.get_rng_state(), state_e)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
    # Dropout really ran (a different seed changes the loss): masks were compared, not skipped.
    assert not torch.equal(_loss_and_grads(compiled, tokens, labels, 13)[0], lc)
    # Eval mode (generation, validation) runs the eager forward.
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens, labels), eager.eval()(tokens, labels))


@pytest.mark.slow  # one inductor compile of the layer
@pytest.mark.skipif(
    onednn_unavailable() is not None, reason=f"no oneDNN linear: {onednn_unavailable()}"
)
def test_compiled_layers_keep_their_onednn_gemms():
    """train.cpu_matmul with train.compile: the compiled layers call the same oneDNN kernels as
    the eager ones (through megagpt::onednn_linear), as many times, with equal results."""
    from torch.profiler import profile

    def kernels(model, seed):
        with profile() as prof:
            out = _loss_and_grads(model, tokens, labels, seed)
        return [e.name for e in prof.events()].count("mkldnn::_linear_pointwise"), out

    torch._dynamo.reset()
    eager, cfg = _tiny()
    compiled, _ = _tiny()
    assert use_onednn(eager) == use_onednn(compiled) > 0
    assert compile_decoder_layers(compiled) == 2
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, 1)
    _loss_and_grads(compiled, tokens, labels, 11)  # compiles
    n_eager, (le, ge) = kernels(eager, 12)
    n_compiled, (lc, gc) = kernels(compiled, 12)
    # Per layer: 4 forward and 4 input-gradient GEMMs and the [h, 4h] weight gradient (2
    # layers), and the output layer's two (not compiled).
    assert n_compiled == n_eager == 2 * 9 + 2
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


def test_compile_always_on_cpu_without_a_cxx_compiler_is_a_config_error(monkeypatch):
    import shutil

    from megagpt.config import load_config, validate
    from megagpt.config.loader import ConfigError

    cfg = load_config(None, ["model.name=gpt3-tiny", "train.compile=always"])
    validate(cfg, 1, cuda=False, need_data=False)  # this machine has one
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="train.compile=always on CPU needs a C\\+\\+ compiler"):
        validate(cfg, 1, cuda=False, need_data=False)
    validate(cfg, 1, cuda=True, need_data=False)  # CUDA: inductor writes Triton kernels
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=true"])  # a YAML bool, not one of the choices
