"""Beam search: the ``num_beams`` most likely continuations of one prompt.

ModelScope's 1.3B+ models offer it (reference §4.2: batch 1, a hypothesis scored by the sum of
its log-probabilities divided by its length ** 1.0). Here, for each prompt:

* ``num_beams`` live beams share one KV cache (the prompt is run once, then its cache rows are
  copied to every beam), on the generator's decoding path (its ``FastDecoder``, else the
  model's forward); each step scores every (beam, token) pair over the true vocabulary and
  takes the best candidates in order (``max(2, 1 + stop tokens) * num_beams`` of them);
* a candidate ending in a stop token (end of document, ``<sep>``) and ranked among the best
  ``num_beams`` becomes a finished hypothesis, scored ``sum log p / generated **
  length_penalty`` where ``generated`` counts its new tokens and the stop token; the others
  become the next beams (``num_beams`` at most);
* the search ends when ``num_beams`` hypotheses are finished and no live beam can still score
  better (its sum only falls with length; with ``length_penalty > 0`` it is judged at the most
  favourable length still possible), or at the row's token limit, where the live beams are
  scored as they stand.

The returned hypotheses are best first; ids are prompt + continuation without the stop token,
as ``TextGenerator.generate`` returns them (the same hypotheses, order and scores as Hugging
Face ``generate(num_beams=k, early_stopping="never")``). Every tensor-parallel rank takes TP
rank 0's candidates, so all ranks keep the same beams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagpt.model.layers import KVCache, reorder_rows


@dataclass(frozen=True)
class Hypothesis:
    """A finished or length-limited beam: ``ids`` (prompt + continuation), its normalised
    ``score`` and the sum of its tokens' log-probabilities ``logprob``."""

    ids: list[int]
    score: float
    logprob: float


def check_beam_args(num_beams: int, num_return_sequences: int, length_penalty: float) -> None:
    """ValueError naming the argument for a beam search that cannot run."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"num_return_sequences={num_return_sequences} with num_beams={num_beams}: beam "
            "search returns at most num_beams hypotheses"
        )
    if length_penalty != length_penalty or abs(length_penalty) == float("inf"):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")


class _Finished:
    """The best ``size`` hypotheses found so far."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[Hypothesis] = []

    def add(self, hyp: Hypothesis) -> None:
        self.items.append(hyp)
        self.items.sort(key=lambda h: -h.score)
        del self.items[self.size :]

    def full(self) -> bool:
        return len(self.items) == self.size

    def worst(self) -> float:
        return self.items[-1].score


@torch.no_grad()
def beam_search(
    generator,
    prompt: list[int],
    *,
    num_beams: int,
    limit: int,
    length_penalty: float = 1.0,
) -> list[Hypothesis]:
    """The ``num_beams`` best hypotheses of ``prompt`` (ids) with ``generator``'s model, each at
    most ``limit`` tokens long (prompt included; ``TextGenerator.limits``); best first."""
    check_beam_args(num_beams, 1, length_penalty)
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    if limit <= len(prompt):
        raise ValueError(f"limit {limit} leaves no room after the {len(prompt)}-token prompt")
    device = generator.device
    stops = set(generator.stop_ids)
    vocab = generator.vocab_size
    generator.model.eval()
    prefill, step_fn, reorder = _passes(generator, limit)
    local = prefill(torch.tensor([prompt], device=device))  # [1, V/tp]
    sums = torch.zeros(1, dtype=torch.float64, device=device)  # each live beam's log-prob
    beams: list[list[int]] = [[]]  # each live beam's new tokens
    finished = _Finished(num_beams)
    # Enough candidates that num_beams of them continue even when every stop token ranks high.
    width = max(2, 1 + len(stops)) * num_beams

    def score(total: float, generated: int) -> float:
        return total / generated**length_penalty

    for step in range(1, limit - len(prompt) + 1):
        logp = torch.log_softmax(generator._full_logits(local).double(), dim=-1)  # [n, V]
        cand = (sums.unsqueeze(1) + logp).view(-1)
        top = torch.topk(cand, min(width, cand.numel()))
        # Every TP rank continues TP rank 0's choice (the gathered logits could differ in a
        # last bit between ranks; diverging beams would desynchronise the collectives).
        values, indices = generator._agree(top.values), generator._agree(top.indices)
        keep: list[tuple[int, int, float]] = []  # (source beam, token, log-prob sum)
        for rank, (total, flat) in enumerate(zip(values.tolist(), indices.tolist())):
            src, token = divmod(flat, vocab)
            if token not in stops:
                keep.append((src, token, total))
            elif rank < num_beams:  # a stop below the best num_beams candidates is dropped
                finished.add(Hypothesis(prompt + beams[src], score(total, step), total))
            if len(keep) == num_beams:
                break
        at_limit = step == limit - len(prompt)
        if keep and finished.full():
            # The best live beam's most favourable score from here on (log-probs only fall).
            best = keep[0][2]
            room = limit - len(prompt) if length_penalty > 0 else step
            if finished.worst() >= score(best, room):
                break
        if not keep:
            break
        if at_limit:
            for src, token, total in keep:
                finished.add(Hypothesis(prompt + beams[src] + [token], score(total, step), total))
            break
        reorder(torch.tensor([src for src, _, _ in keep], device=device), len(prompt) + step - 1)
        beams = [beams[src] + [token] for src, token, _ in keep]
        sums = torch.tensor([total for _, _, total in keep], dtype=torch.float64, device=device)
        tokens = torch.tensor([token for _, token, _ in keep], device=device)
        local = step_fn(tokens, len(prompt) + step - 1)
    return finished.items


def _passes(generator, limit: int):
    """(prefill, step, reorder) over the generator's decoding path: its ``FastDecoder`` where
    it decodes with one (the same logits as the model's forward, fewer passes over memory),
    else the model's own forward with a ``KVCache``. ``prefill(ids [1, L])`` and ``step(ids
    [k], position)`` return local logits [rows, V/tp]; ``reorder(index, filled)`` makes the
    cache's rows ``index`` (row copies for the kept beams) over its first ``filled`` slots."""
    if generator.uses_fast_path():
        dec = generator.decoder()
        dec.begin()
        cache = dec.new_cache(1, limit)

        def reorder(index: torch.Tensor, filled: int) -> None:
            cache.keys = [reorder_rows(k, index, filled) for k in cache.keys]
            cache.values = [reorder_rows(v, index, filled) for v in cache.values]

        return (
            lambda ids: dec.prefill(ids, None, cache),
            lambda ids, position: dec.step(ids, position, cache),
            reorder,
        )
    kv = KVCache(generator.num_layers, limit)
    model = generator.model
    return (
        lambda ids: model(ids, kv_cache=kv)[-1],
        lambda ids, position: model(ids.unsqueeze(1), kv_cache=kv)[-1],
        lambda index, filled: kv.reorder(index),
    )
