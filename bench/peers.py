"""The Hugging Face peer the benchmarks measure megagpt against: a ``GPT2LMHeadModel`` of the
same shape as a megagpt model config, one definition for every benchmark."""

from __future__ import annotations


def gpt2_config(cfg, vocab_size: int | None = None):
    """A transformers ``GPT2Config`` of ``cfg``'s shape (a megagpt model config): ``cfg``'s dropout
    (the benchmarks set it to 0 unless asked, e.g. ``--set model.attention_dropout=0.1``), tied
    embeddings, SDPA attention (the kernel megagpt uses), and no GPT-2 special tokens:
    its 50256 lies outside megagpt's vocabularies, and no benchmark stops early."""
    from transformers import GPT2Config

    hc = GPT2Config(
        vocab_size=vocab_size or cfg.vocab_size,
        n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.ffn,
        activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        layer_norm_epsilon=cfg.layernorm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention_dropout,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    hc._attn_implementation = "sdpa"
    return hc
