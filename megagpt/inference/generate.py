"""Autoregressive decoding with a KV cache, for one prompt or a batch, at any TP size.

Batched prompts follow the original (reference §4.3): right-padded, decoding starts at the
shortest prompt, rows whose prompt is longer are teacher-forced up to their own length, and every
row uses positions 0..L-1. Padding lies to the right of every real token, so a causal model never
attends to it: a batch gives the same tokens as its prompts one at a time.

Under tensor parallelism every rank of the TP group runs the same loop: the vocab-parallel logits
are all-gathered, the token is chosen from the full distribution and broadcast from TP rank 0, so
all ranks stay in lockstep and greedy output equals TP=1's.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagpt.inference.sampling import DEFAULT_NEW_TOKENS, SamplingParams, sample
from megagpt.inference.sampling import apply_repetition_penalty as _penalise
from megagpt.model import KVCache


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
    """

    def __init__(self, model: torch.nn.Module, *, vocab_size: int, max_positions: int,
                 stop_ids: list[int], pad_id: int = 0, tp_group=None, tp_size: int = 1):
        self.model = model
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.stop_ids = sorted(set(stop_ids))
        self.pad_id = pad_id
        self.tp_group = tp_group
        self.tp_size = tp_size
        self.num_layers = len(model.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- limits ---------------------------------------------------------------------------
    def limits(self, prompt_lengths: list[int], max_length: int | None = None,
               max_new_tokens: int | None = None) -> list[int]:
        """Total length (prompt included) each row may reach; ValueError when there is no room.

        Default: prompt + 100 tokens; always capped at the model's positions.
        """
        if max_length is not None and max_new_tokens is not None:
            raise ValueError("give max_length (total, prompt included) or max_new_tokens, "
                             "not both")
        out = []
        cap = self.max_positions
        for n in prompt_lengths:
            if n >= cap:
                raise ValueError(f"the prompt has {n} tokens but the model has only {cap} "
                                 "positions: no room to generate (max_length counts the "
                                 "prompt); shorten the prompt")
            if max_length is not None:
                limit = int(max_length)
                if limit <= n:
                    raise ValueError(f"max_length={limit} leaves no room to generate: the prompt "
                                     f"already has {n} tokens (max_length counts the prompt)")
            else:
                limit = n + (DEFAULT_NEW_TOKENS if max_new_tokens is None else int(max_new_tokens))
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
            dist.broadcast(tokens, src=dist.get_global_rank(self.tp_group, 0),
                           group=self.tp_group)
        return tokens

    @torch.no_grad()
    def steps(self, prompts: list[list[int]], params: SamplingParams, limits: list[int],
              generators: list[torch.Generator] | None = None, use_cache: bool = True
              ) -> Iterator[DecodeState]:
        """Decode ``prompts`` (non-empty id lists) up to ``limits``; yields after each step.

        A row stops at its first stop token (not returned) or at its limit. ``generators`` (one
        per row) make sampling reproducible; a row draws from its own generator only on the
        steps where it generates, so its output does not depend on the rest of the batch.
        """
        params.check(self.vocab_size)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: give at least one token")
        device = self.device
        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        limit_t = torch.tensor(limits, device=device)
        total = max(limits)
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        ends = lengths.clone()
        cache = KVCache(self.num_layers) if use_cache else None
        pos = int(lengths.min())
        fed = 0  # tokens already in the cache
        self.model.eval()
        while pos < total and not bool(done.all()):
            if cache is not None:
                logits = self.model(tokens[:, fed:pos], kv_cache=cache)  # [s, b, V/tp]
                fed = pos
            else:
                logits = self.model(tokens[:, :pos])
            last = self._full_logits(logits[-1])  # [b, V]
            in_prompt = lengths > pos
            active = ~done & ~in_prompt
            chosen = torch.full((b,), self.pad_id, dtype=torch.long, device=device)
            rows = active.nonzero().flatten().tolist()
            if rows:
                scores = last[rows]
                if params.repetition_penalty != 1.0:
                    scores = _penalise(scores, tokens[rows, :pos], params.repetition_penalty)
                gens = [generators[i] for i in rows] if generators is not None else None
                chosen[rows] = sample(scores, params, gens)
            chosen = self._agree(chosen)
            tokens[:, pos] = torch.where(in_prompt, tokens[:, pos], chosen)
            stopped = active & torch.isin(chosen, stop)
            grew = active & ~stopped
            ends = torch.where(grew, torch.full_like(ends, pos + 1), ends)
            done = done | stopped | (grew & (limit_t <= pos + 1))
            pos += 1
            yield DecodeState(tokens, ends, done)

    def generators_for(self, prompts: list[list[int]], copies: int, seed: int | None
                       ) -> list[torch.Generator]:
        """One generator per output row (prompt-major, copies consecutive)."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") % (2**63)
        return [torch.Generator().manual_seed(_row_seed(seed, p, c))
                for p in prompts for c in range(copies)]

    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 max_length: int | None = None, max_new_tokens: int | None = None,
                 seed: int | None = None, num_return_sequences: int = 1,
                 use_cache: bool = True) -> list[list[list[int]]]:
        """For each prompt, ``num_return_sequences`` id lists: prompt + continuation (cut before
        the stop token)."""
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        if num_return_sequences > 1 and params.greedy:
            raise ValueError("num_return_sequences > 1 with greedy decoding (top_k=1) would "
                             "return identical copies; sample instead")
        rows = [p for p in prompts for _ in range(num_return_sequences)]
        limits = self.limits([len(p) for p in rows], max_length, max_new_tokens)
        gens = None if params.greedy else self.generators_for(
            prompts, num_return_sequences, seed)
        state = None
        for state in self.steps(rows, params, limits, gens, use_cache):  # noqa: B007
            pass
        flat = [state.row(i) for i in range(len(rows))]
        k = num_return_sequences
        return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
