"""Autoregressive decoding with a KV cache, for one prompt or a batch, at any TP size.

Batched prompts are right-padded; every row uses positions 0..L-1 of its own tokens, and
padding lies to the right of every real token, so a causal model never attends to it: a batch
gives the same tokens as its prompts one at a time. Two loops produce the same tokens:

- the fast path (default; ``decode.FastDecoder``): every prompt in one prefill, then each row
  decodes at its own position (a per-row mask over the cache when the prompts' lengths differ),
  with oneDNN-packed weights on CPU and greedy choice on the vocab shard;
- the reference loop (``fast=False``, and always for ``static`` / ``compile`` / no cache): the
  model's own forward, the prompts' common prefix first, longer rows teacher-forced to their
  length as in the original (reference §4.3).

Under tensor parallelism every rank of the TP group runs the same loop and stays in lockstep:
greedy rows take the best (value, id) of each rank's vocab shard (no gather of the logits);
sampled rows gather the vocab-parallel logits, draw, and take TP rank 0's draw. Greedy output
equals TP=1's.

The loop keeps its state on the device: the KV cache is allocated once for the longest row
(prompt + new tokens) and written in place, tokens are chosen on the device for the whole batch
(``sampling.sample``), and the only value read back to the host is "are all rows done?", every
``check_every`` steps. With ``static=True`` the decode step has static shapes (a fixed-size cache
indexed by a position tensor), so ``compile=True`` can hand it to ``torch.compile`` (CUDA graphs
on GPU via mode "reduce-overhead").
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megagpt.inference.decode import FastDecoder
from megagpt.inference.speculative import speculative_loop
from megagpt.inference.sampling import (
    GenerationDefaults,
    SamplingParams,
    penalise_seen,
    row_key,
    sample,
)
from megagpt.model import KVCache


# Guessed tokens checked per pass in greedy decoding (BENCHMARKS-generate.md).
DEFAULT_SPECULATE = 7


@dataclass
class DecodeState:
    """What one decoding step leaves: ``tokens`` [b, T] (prompts and generated ids), ``ends``
    [b] (each row's length so far, without a stop token) and ``done`` [b]."""

    tokens: torch.Tensor
    ends: torch.Tensor
    done: torch.Tensor

    def row(self, i: int) -> list[int]:
        return self.tokens[i, : int(self.ends[i])].tolist()


def _row_seed(seed: int, prompt: list[int], copy: int) -> int:
    # A row's seed depends on the call's seed, the prompt's tokens and the index of the returned
    # copy, not on the prompt's place in the batch: batching does not change sampled output, and
    # different prompts do not share one random stream.
    digest = zlib.crc32(struct.pack(f"<{len(prompt)}q", *prompt))
    return (seed * 1_000_003 + digest * 7919 + copy * 104_729) % (2**63)


class TextGenerator:
    """Decodes token ids with a loaded GPTModel (the whole model, pipeline size 1).

    Args:
        model: a GPTModel (possibly tensor-parallel) in eval mode.
        vocab_size: the true vocabulary; logits past it are never chosen.
        max_positions: the model's learned positions (``max_length`` is capped there).
        stop_ids: token ids that end a row (end-of-document, ``<sep>``).
        pad_id: filler for right padding (never attended to, never returned).
        tp_group, tp_size: the tensor-parallel group the model is split over.
        static: decode steps with static shapes (whole fixed-size cache, masked, at a position
            tensor). Same tokens; on CPU slower than the default, which attends to the filled
            prefix only.
        compile: ``torch.compile`` the static decode step (implies ``static``; TP=1 only).
            Off by default: on CPU it was not measured faster (BENCHMARKS-generate.md).
        check_every: steps between the host checks "are all rows done?". Steps after every row
            stopped change nothing, so a larger value only trades wasted steps for fewer
            device-to-host syncs. Default: 1 on CPU (where the check is free and a wasted step
            is not), 8 on accelerators.
        fast: decode with ``FastDecoder`` (megagpt/inference/decode.py): one prefill of all
            prompts (ragged ones right-padded), steps with per-row positions, greedy argmax on
            the vocab shard. Same tokens as the reference loop (``fast=False``: the model's
            own forward, the common prefix first, longer prompts teacher-forced), which the
            static / compiled step and ``use_cache=False`` always use.
        prepack: the fast path multiplies by oneDNN-packed copies of the weights
            (``decode.DecodeWeights``: up to 2x the weights' memory again, rebuilt when the
            weights change). None: on CPU with fp32 weights; False for models too big to copy.
        speculate: greedy decoding on the fast path checks up to this many guessed tokens per
            row and pass (n-gram drafts from the row's own text,
            megagpt/inference/speculative.py); the tokens are the greedy ones. 0: one token
            per pass. Not used when sampling or with a repetition penalty.
        defaults: the model's decoding defaults (``GenerationDefaults``): the new tokens of a
            call that gives no length here, its sampling options in the pipeline.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        max_positions: int,
        stop_ids: list[int],
        pad_id: int = 0,
        tp_group=None,
        tp_size: int = 1,
        static: bool = False,
        compile: bool = False,
        check_every: int | None = None,
        fast: bool = True,
        prepack: bool | None = None,
        speculate: int = DEFAULT_SPECULATE,
        defaults: GenerationDefaults | None = None,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.stop_ids = sorted(set(stop_ids))
        self.pad_id = pad_id
        self.tp_group = tp_group
        self.tp_size = tp_size
        self.num_layers = len(model.layers)
        self.static = static
        self.compile = False
        self.check_every = check_every
        self._compiled = None
        if compile:
            self.use_compiled_step()
        self.fast = fast
        self.prepack = prepack
        self._decoder: FastDecoder | None = None
        if speculate < 0:
            raise ValueError(f"speculate must be >= 0 (guessed tokens per pass), got {speculate}")
        self.speculate = speculate
        self.last_stats: dict = {}  # the last speculative call's pass and guess counts
        self.defaults = defaults or GenerationDefaults()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- limits ---------------------------------------------------------------------------
    def limits(
        self,
        prompt_lengths: list[int],
        max_length: int | None = None,
        max_new_tokens: int | None = None,
    ) -> list[int]:
        """Total length (prompt included) each row may reach; ValueError when there is no room.

        Default: prompt + the model's default new tokens (``defaults``: 100 unless its
        checkpoint says otherwise); always capped at the model's positions.
        """
        if max_length is not None and max_new_tokens is not None:
            raise ValueError("give max_length (total, prompt included) or max_new_tokens, not both")
        out = []
        cap = self.max_positions
        for n in prompt_lengths:
            if n >= cap:
                raise ValueError(
                    f"the prompt has {n} tokens but the model has only {cap} "
                    "positions: no room to generate (max_length counts the "
                    "prompt); shorten the prompt"
                )
            if max_length is not None:
                limit = int(max_length)
                if limit <= n:
                    raise ValueError(
                        f"max_length={limit} leaves no room to generate: the prompt "
                        f"already has {n} tokens (max_length counts the prompt)"
                    )
            else:
                new = self.defaults.new_tokens if max_new_tokens is None else int(max_new_tokens)
                limit = n + new
                if max_new_tokens is not None and max_new_tokens < 1:
                    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            out.append(min(limit, cap))
        return out

    # -- the loop -------------------------------------------------------------------------
    def _full_logits(self, local: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel [b, V_padded/tp] -> float32 [b, V_true] (gathered over TP)."""
        local = local.float()
        if self.tp_size > 1:
            parts = [torch.empty_like(local) for _ in range(self.tp_size)]
            dist.all_gather(parts, local.contiguous(), group=self.tp_group)
            local = torch.cat(parts, dim=-1)
        return local[:, : self.vocab_size]

    def _agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every TP rank takes TP rank 0's choice (sampling on each rank could differ in the
        last float bit of the gathered logits)."""
        if self.tp_size > 1:
            dist.broadcast(tokens, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return tokens

    def _decode_static(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step with static shapes: ids [b, 1] at slot ``cache.position`` (0-d
        tensor) -> vocab-parallel logits [b, V/tp]. The computation of ``GPTModel.forward`` for
        one token, written against its blocks because ``forward`` takes the position offset as a
        Python int (under torch.compile, one graph per position)."""
        m = self.model
        pos = m.position.position_embeddings(cache.position)  # [h]
        h = (m.word(token) + pos).transpose(0, 1)  # [b, 1, h] -> [1, b, h]
        for layer in m.layers:
            h = layer(h, cache)
        # The tied output layer without ``WordEmbedding.logits``' region copy (an identity
        # without autograd, whose megatron-core helper warns: a graph break) and its masking of
        # padded rows (``_full_logits`` cuts them off).
        return F.linear(m.final_norm(h)[-1], m.word.word_embeddings.weight)  # [b, V/tp]

    def use_compiled_step(self) -> None:
        """From now on decode through the static step under ``torch.compile`` (``compile=True``
        of the constructor): inductor with CUDA graphs on a GPU, one compile per batch size;
        the reference loop, so no n-gram speculation. Tensor-parallel size 1 only."""
        if self.tp_size > 1:
            raise ValueError(
                "a compiled decode step supports tensor-parallel size 1 only (the logits "
                f"all-gather is outside the captured step); this model runs at {self.tp_size}"
            )
        self.static = self.compile = True
        self._compiled = None

    def _static_step(self):
        if not self.compile:
            return self._decode_static
        if self._compiled is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._compiled = torch.compile(
                self._decode_static, fullgraph=True, dynamic=False, mode=mode
            )
        return self._compiled

    def uses_fast_path(self, use_cache: bool = True) -> bool:
        """Whether decoding goes through ``FastDecoder`` (``decoder()``): on by default; off
        with ``fast=False``, without the KV cache, or with the static (compilable) step."""
        return self.fast and use_cache and not self.static and hasattr(self.model, "final_norm")

    def decoder(self) -> FastDecoder:
        """The fast path's decoder over this generator's model (made once; its weight copies
        follow the model's parameters)."""
        if self._decoder is None or self._decoder.model is not self.model:
            self._decoder = FastDecoder(
                self.model, tp_group=self.tp_group, tp_size=self.tp_size, prepack=self.prepack
            )
        return self._decoder

    @torch.no_grad()
    def steps(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        limits: list[int],
        keys: list[int] | None = None,
        use_cache: bool = True,
    ) -> Iterator[DecodeState]:
        """Decode ``prompts`` (non-empty id lists) up to ``limits``; yields after each step.

        A row stops at its first stop token (not returned) or at its limit. ``keys`` (one 32-bit
        sampling key per row, ``keys_for``) make sampling reproducible; a row's draw at a
        position depends only on its key, so its output does not depend on the rest of the
        batch. The yielded state is updated in place; a step after every row stopped changes
        nothing.
        """
        params.check(self.vocab_size)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: give at least one token")
        if len(limits) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(limits)} limits")
        device = self.device
        b = len(prompts)
        total = max(limits)
        host = torch.full((b, total), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            host[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        loop = self._fast_loop if self.uses_fast_path(use_cache) else self._reference_loop
        if (
            loop == self._fast_loop
            and self.speculate > 0
            and params.greedy
            and params.repetition_penalty == 1.0
        ):
            loop = self._speculative
        self.model.eval()
        yield from loop(
            host.to(device),
            [len(p) for p in prompts],
            limits,
            params,
            None if keys is None else torch.tensor(keys, dtype=torch.long, device=device),
            use_cache,
        )

    def _seen_mask(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[b, V] presence of each token in each row's prompt, for the repetition penalty."""
        filled = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(
            0
        ) < lengths.unsqueeze(1)
        return (
            torch.zeros(tokens.shape[0], self.vocab_size, device=tokens.device).scatter_add_(
                1, tokens.clamp(0, self.vocab_size - 1), filled.float()
            )
            > 0
        )  # padding: +0

    def _choose(
        self,
        local: torch.Tensor,
        params: SamplingParams,
        key_t,
        step,
        seen,
        dec: FastDecoder | None,
    ) -> torch.Tensor:
        """Next ids [b] from vocab-parallel logits [b, V/tp] (the same on every TP rank)."""
        if params.greedy and seen is None and dec is not None:
            return dec.greedy(local, self.vocab_size)  # no gather of the full logits
        last = self._full_logits(local)
        if seen is not None:
            last = penalise_seen(last, seen, params.repetition_penalty)
        return self._agree(sample(last, params, key_t, step))

    def _fast_loop(
        self,
        tokens: torch.Tensor,
        prompt_lengths: list[int],
        limits: list[int],
        params: SamplingParams,
        key_t,
        use_cache: bool,
    ) -> Iterator[DecodeState]:
        """``FastDecoder``: every prompt in one prefill (right-padded), then every row decodes
        at its own position (all rows share it when the prompts have one length)."""
        device = tokens.device
        b, total = tokens.shape
        dec = self.decoder()
        uniform = len(set(prompt_lengths)) == 1
        longest = max(prompt_lengths)
        lengths = torch.tensor(prompt_lengths, device=device)
        limit_t = torch.tensor(limits, device=device)
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        ends = lengths.clone()
        seen = self._seen_mask(tokens, lengths) if params.repetition_penalty != 1.0 else None
        check_every = self.check_every or (1 if device.type == "cpu" else 8)
        cache = dec.new_cache(b, total, zeroed=not uniform)
        dec.begin()
        local = dec.prefill(tokens[:, :longest], None if uniform else lengths, cache)
        # pos: where each row's next token goes (a host int when shared; the device tensor
        # ``pos_t`` is also the sampler's step, per row)
        pos_t = lengths.clone()
        steps = max(lim - n for lim, n in zip(limits, prompt_lengths))
        rows = torch.arange(b, device=device).unsqueeze(1)  # [b, 1]
        for t in range(steps):
            chosen = self._choose(local, params, key_t, pos_t, seen, dec)
            active = ~done
            slot = pos_t.clamp(max=total - 1).unsqueeze(1)  # [b, 1]; done rows may run past
            if uniform:
                tokens[:, longest + t] = torch.where(active, chosen, tokens[:, longest + t])
            else:
                tokens[rows, slot] = torch.where(
                    active, chosen, tokens.gather(1, slot)[:, 0]
                ).unsqueeze(1)
            grew = active
            if stop.numel():
                stopped = active & torch.isin(chosen, stop)
                grew = active & ~stopped
                done = done | stopped
            ends = torch.where(grew, pos_t + 1, ends)
            done = done | (grew & (limit_t <= pos_t + 1))
            if seen is not None:
                idx = chosen.clamp(0, self.vocab_size - 1).unsqueeze(1)  # [b, 1]
                seen.scatter_(1, idx, seen.gather(1, idx) | grew.unsqueeze(1))
            yield DecodeState(tokens, ends, done)
            if t + 1 == steps or ((t + 1) % check_every == 0 and bool(done.all())):
                return
            if uniform:
                local = dec.step(chosen, longest + t, cache)
            else:
                local = dec.step(chosen, slot[:, 0], cache, span=min(longest + t + 1, total))
            pos_t += 1

    def _speculative(
        self,
        tokens: torch.Tensor,
        prompt_lengths: list[int],
        limits: list[int],
        params: SamplingParams,
        key_t,
        use_cache: bool,
    ) -> Iterator[DecodeState]:
        """Greedy decoding with n-gram drafts (``speculative.speculative_loop``)."""
        self.last_stats = {}
        for toks, ends, done in speculative_loop(
            self.decoder(),
            tokens,
            prompt_lengths,
            limits,
            self.stop_ids,
            self.vocab_size,
            self.max_positions - 1,
            self.speculate,
            self.last_stats,
        ):
            yield DecodeState(toks, ends, done)

    def _reference_loop(
        self,
        tokens: torch.Tensor,
        prompt_lengths: list[int],
        limits: list[int],
        params: SamplingParams,
        key_t,
        use_cache: bool,
    ) -> Iterator[DecodeState]:
        """The model's own forward: the prompts' common prefix in one pass, then one token at a
        time for every row (rows whose prompt is longer are teacher-forced to their length)."""
        device = tokens.device
        b, total = tokens.shape
        lengths = torch.tensor(prompt_lengths, device=device)
        limit_t = torch.tensor(limits, device=device)
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        pad = torch.full((b,), self.pad_id, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        ends = lengths.clone()
        seen = self._seen_mask(tokens, lengths) if params.repetition_penalty != 1.0 else None
        cache = KVCache(self.num_layers, total, static=self.static) if use_cache else None
        check_every = self.check_every or (1 if device.type == "cpu" else 8)
        pos = int(min(prompt_lengths))
        start = pos
        pos_t = torch.tensor(pos, device=device)  # the sampler's step, kept on the device
        while pos < total:
            if cache is None:
                last = self.model(tokens[:, :pos])[-1]  # [b, V/tp]
            elif cache.length == 0:  # the prompts' common prefix in one pass
                last = self.model(tokens[:, :pos], kv_cache=cache)[-1]
                if self.static:
                    cache.begin_static(device)
            elif self.static:
                last = self._static_step()(tokens[:, pos - 1 : pos], cache)
                cache.position.add_(1)
            else:
                last = self.model(tokens[:, pos - 1 : pos], kv_cache=cache)[-1]
            in_prompt = lengths > pos
            active = ~done & ~in_prompt
            chosen = torch.where(active, self._choose(last, params, key_t, pos_t, seen, None), pad)
            tokens[:, pos] = torch.where(in_prompt, tokens[:, pos], chosen)
            stopped = active & torch.isin(chosen, stop)
            grew = active & ~stopped
            ends = torch.where(grew, pos + 1, ends)
            done = done | stopped | (grew & (limit_t <= pos + 1))
            if seen is not None:
                idx = chosen.clamp(0, self.vocab_size - 1).unsqueeze(1)  # [b, 1]
                seen.scatter_(1, idx, seen.gather(1, idx) | grew.unsqueeze(1))
            pos += 1
            pos_t.add_(1)
            yield DecodeState(tokens, ends, done)
            if (pos - start) % check_every == 0 and bool(done.all()):
                return

    def keys_for(self, prompts: list[list[int]], copies: int, seed: int | None) -> list[int]:
        """One 32-bit sampling key per output row (prompt-major, copies consecutive)."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") % (2**63)
        return [row_key(_row_seed(seed, p, c)) for p in prompts for c in range(copies)]

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        num_return_sequences: int = 1,
        use_cache: bool = True,
    ) -> list[list[list[int]]]:
        """For each prompt, ``num_return_sequences`` id lists: prompt + continuation (cut before
        the stop token)."""
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        if num_return_sequences > 1 and params.greedy:
            raise ValueError(
                "num_return_sequences > 1 with greedy decoding (top_k=1) would "
                "return identical copies; sample instead"
            )
        rows = [p for p in prompts for _ in range(num_return_sequences)]
        limits = self.limits([len(p) for p in rows], max_length, max_new_tokens)
        keys = None if params.greedy else self.keys_for(prompts, num_return_sequences, seed)
        state = None
        for state in self.steps(rows, params, limits, keys, use_cache):  # noqa: B007
            pass
        tokens, ends = state.tokens.cpu(), state.ends.tolist()  # one copy back to the host
        flat = [tokens[i, : ends[i]].tolist() for i in range(len(rows))]
        k = num_return_sequences
        return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
