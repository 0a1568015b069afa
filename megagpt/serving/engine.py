"""Continuous batching: one scheduler thread owns the model and decodes every live request in
one loop; a request joins and leaves between steps.

Layout:

- ``Sequence``: one completion being generated (a request with ``n`` copies of ``p`` prompts
  is ``n * p`` sequences), with its sampling options, key, limit and text state.
- ``Executor``: the model operations (prefill a row, decode all active rows, move a row). It
  runs on every tensor-parallel rank; the forward's collectives keep the ranks together. It
  decodes with the generator's fast path (``FastDecoder``, the same as ``megagpt generate``:
  oneDNN-packed weights on CPU, keys and values written in place into one buffer per layer with
  a row per slot, a prefill written straight into its row), or with the model's own forward and
  a ``SlotCache`` where the generator does not take that path.
- ``Engine``: the scheduler (rank 0 only). It admits waiting sequences into free rows (prefill:
  the prompts that arrived together through the model in one pass, into their rows' slots),
  runs one decode step for all active rows (each at its own position; greedy rows may check
  guessed tokens, speculative decoding), samples every row's next
  token, hands new text to the request's sink and frees the rows of finished sequences. Under
  tensor parallelism each operation is broadcast to the other ranks before it runs
  (``follow`` is their loop).

Sampling reuses ``megagpt.inference.sampling``: a sampled row's draw depends only on its key
and position (``TextGenerator.keys_for``), so the same seed gives the same text whoever shares
the batch, and greedy rows give one-at-a-time ``TextGenerator`` tokens.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megagpt.inference.decode import DecodeCache, FastDecoder
from megagpt.inference.generate import TextGenerator
from megagpt.inference.sampling import SamplingParams, penalise_seen, sample
from megagpt.inference.speculative import (
    MIN_GUESSES_ONE_ROW,
    rows_per_step,
    Acceptance,
    NgramDrafter,
    plan_pass,
    settle,
)
from megagpt.model import KVCache
from megagpt.serving.cache import SlotCache
from megagpt.serving.text import CompletionText

log = logging.getLogger(__name__)

# Followers wait in a broadcast for the next operation; an idle scheduler sends one this often
# so that a quiet server never runs into the process group's collective timeout.
HEARTBEAT_S = 30.0


@dataclass
class Event:
    """What a sink receives: new ``text`` of choice ``index``; ``finish_reason`` ("stop",
    "length" or "error") and ``tokens`` (generated count) on the last event of the choice."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One completion: ``prompt`` ids, decoded up to ``limit`` total tokens (prompt included).

    ``sink`` is called from the scheduler thread with each ``Event`` (it must not block);
    ``cancel()`` (any thread) makes the scheduler drop the sequence at its next step.
    """

    prompt: list[int]
    params: SamplingParams
    limit: int
    text: CompletionText
    sink: Callable[[Event], None]
    index: int = 0
    key: int | None = None
    generated: list[int] = field(default_factory=list)
    row: int = -1
    cancelled: bool = False
    # Greedy rows under speculation: n-gram guesses from the row's text, and their kept rate.
    drafter: NgramDrafter | None = field(default=None, repr=False)
    accept: Acceptance | None = field(default=None, repr=False)
    # The finishing event, held until the row is free (``Engine._release``).
    final: Event | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def last(self) -> int:
        return self.generated[-1] if self.generated else self.prompt[-1]


class Executor:
    """The model operations of the serving loop, identical on every tensor-parallel rank.

    Operations are tuples (so that they can be broadcast as they are):
    - ``("prefill", row, prompts)`` -> logits [n, V] at each prompt's last token; the n
      prompts go into rows ``row`` .. ``row + n - 1`` (in one pass on the fast path);
    - ``("decode", tokens, positions)`` -> logits [rows, V]; row r feeds ``tokens[r]`` at
      ``positions[r]``;
    - ``("verify", fed, starts, counts)`` -> logits [sum(counts), V], row after row; row r
      feeds the first ``counts[r]`` of the s tokens ``fed[r]`` (the rest is padding) from
      ``starts[r]`` on (fast path only: speculative decoding's check);
    - ``("move", src, dst, length)``; ``("idle",)``; ``("stop",)``.
    """

    def __init__(self, generator: TextGenerator, slots: int):
        self.model = generator.model
        self.vocab_size = generator.vocab_size
        self.tp_group = generator.tp_group
        self.tp_size = generator.tp_size
        self.num_layers = generator.num_layers
        self.max_length = generator.max_positions
        self.device = generator.device
        self.pad_id = generator.pad_id
        # Vocab-parallel [b, V_padded/tp] -> float32 [b, V_true], gathered over TP.
        self._full_logits = generator._full_logits
        # The generator's fast path (``FastDecoder``: packed weights on CPU, in-place cache
        # writes, the output layer only where needed) decodes into one buffer per layer of
        # [slots, heads, max_length, head_dim]; a row's prefill writes straight into its slot.
        # Without it (``fast=False``, the static/compiled step), the model's own forward with a
        # ``SlotCache``.
        self.decoder: FastDecoder | None = None
        self.slots: DecodeCache | None = None
        # Speculation (greedy rows, fast path): a check feeds a row up to this many guesses
        # past its last token, so the cache has as many spare slots past the longest row.
        self.speculate = 0
        if generator.uses_fast_path():
            self.decoder = generator.decoder()
            self.decoder.begin()
            self.speculate = generator.speculate
        else:
            self.cache = SlotCache(self.num_layers, slots, self.max_length)
        self._slot_count = slots

    def _rows(self, start: int, stop: int) -> DecodeCache:
        """The fast path's cache restricted to rows start..stop-1 (views; allocated on first
        use, zeroed: a masked slot must not hold NaN)."""
        if self.slots is None:
            assert self.decoder is not None
            self.slots = self.decoder.new_cache(
                self._slot_count, self.max_length + self.speculate, zeroed=True
            )
        return DecodeCache(
            [k[start:stop] for k in self.slots.keys], [v[start:stop] for v in self.slots.values]
        )

    @torch.no_grad()
    def run(self, op: tuple) -> torch.Tensor | None:
        kind = op[0]
        if kind == "prefill":
            _, first, prompts = op
            if self.decoder is not None:
                # Right-padded into one pass; a row's padding slots are written over by its
                # own decode steps before anything reads them.
                longest = max(len(p) for p in prompts)
                tokens = torch.full(
                    (len(prompts), longest), self.pad_id, dtype=torch.long, device=self.device
                )
                for i, p in enumerate(prompts):
                    tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=self.device)
                lengths = (
                    None
                    if all(len(p) == longest for p in prompts)
                    else torch.tensor([len(p) for p in prompts], device=self.device)
                )
                # New requests: the weights are looked up (and their packs checked against
                # the model) here, not at every step.
                self.decoder.begin()
                rows = self._rows(first, first + len(prompts))
                return self._full_logits(self.decoder.prefill(tokens, lengths, rows))
            out = []
            for row, ids in enumerate(prompts, start=first):
                tokens = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, n]
                prefill = KVCache(self.num_layers, len(ids))
                out.append(self.model(tokens, kv_cache=prefill)[-1])  # [1, V/tp]
                self.cache.store(row, prefill, len(ids))
            return self._full_logits(torch.cat(out))
        if kind == "decode":
            _, ids, positions = op
            return self._decode(
                torch.tensor(ids, dtype=torch.long, device=self.device),
                positions,
            )
        if kind == "verify" and self.decoder is not None:
            _, fed, starts, counts = op
            ids = torch.tensor(fed, dtype=torch.long, device=self.device)  # [rows, s]
            local = self.decoder.verify(
                ids,
                torch.tensor(starts, dtype=torch.long, device=self.device),
                self._rows(0, len(fed)),
                span=max(starts) + ids.shape[1],
                max_position=self.max_length - 1,
                counts=torch.tensor(counts, dtype=torch.long, device=self.device),
            )
            return self._full_logits(local)
        if kind == "move":
            _, src, dst, length = op
            if self.decoder is None:
                self.cache.move(src, dst, length)
            elif self.slots is not None:
                for buf in (*self.slots.keys, *self.slots.values):
                    buf[dst, :, :length] = buf[src, :, :length]
            return None
        if kind in ("idle", "stop"):
            return None
        raise ValueError(f"unknown serving operation {kind!r}")

    def _decode(self, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One token per active row: ids [rows] at ``positions`` (one per row) -> float32
        logits [rows, V]."""
        span = max(positions) + 1
        if self.decoder is not None:
            cache = self._rows(0, len(positions))
            if len(set(positions)) == 1:  # every row at the same slot: no mask needed
                return self._full_logits(self.decoder.step(ids, positions[0], cache))
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
            return self._full_logits(self.decoder.step(ids, pos, cache, span=span))
        # ``GPTModel.forward`` for one token (as ``TextGenerator._decode_static``), with a
        # position per row instead of one offset for the batch.
        m = self.model
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.cache.begin_step(pos, span)
        pos_emb = m.position.position_embeddings(pos)  # [rows, h]
        h = (m.word(ids.unsqueeze(1)) + pos_emb.unsqueeze(1)).transpose(0, 1)  # [1, rows, h]
        for layer in m.layers:
            h = layer(h, self.cache)
        local = F.linear(m.final_norm(h)[-1], m.word.word_embeddings.weight)  # [rows, V/tp]
        return self._full_logits(local)

    def broadcast(self, op: tuple | None) -> tuple:
        """TP rank 0 sends ``op``; the others receive it (``op`` ignored there)."""
        box = [op]
        dist.broadcast_object_list(
            box, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group
        )
        return box[0]


def follow(executor: Executor) -> None:
    """The loop of tensor-parallel ranks > 0: run what rank 0 broadcasts until ``stop``."""
    while True:
        op = executor.broadcast(None)
        if op[0] == "stop":
            return
        executor.run(op)


class Engine:
    """The scheduler (TP rank 0): ``submit`` sequences from any thread; ``start``/``close``.

    Args:
        generator: the loaded ``TextGenerator`` (its model, vocab, stop ids, TP group).
        max_batch: rows decoded together; further requests wait for a free row.
    """

    def __init__(self, generator: TextGenerator, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.generator = generator
        self.max_batch = max_batch
        self.executor = Executor(generator, max_batch)
        self.stop_ids = set(generator.stop_ids)
        self.waiting: queue.Queue[Sequence | None] = queue.Queue()
        self.active: list[Sequence] = []
        self.steps = 0  # decode steps run (for tests and the benchmark)
        self.max_rows_seen = 0  # the most rows one decode step carried
        # Greedy rows check up to ``speculate`` n-gram guesses per step (the generator's
        # setting, as ``TextGenerator`` does; fast path only); other rows take one token.
        self.speculate = self.executor.speculate
        self.rows_per_step = rows_per_step(generator.device)
        self.spec_stats = {"checks": 0, "guessed": 0, "kept": 0}
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="megagpt-serve-scheduler", daemon=True
        )
        self._thread.start()

    def submit(self, sequences: list[Sequence]) -> None:
        for s in sequences:
            self.waiting.put(s)

    def close(self) -> None:
        """Stop the loop (and the followers); waiting and active sequences end with "error"."""
        self._closing.set()
        self.waiting.put(None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout=60)
        else:
            self._run(("stop",))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop -------------------------------------------------------------------------
    def _run(self, op: tuple) -> torch.Tensor | None:
        if self.executor.tp_size > 1:
            self.executor.broadcast(op)
        return self.executor.run(op)

    def _loop(self) -> None:
        try:
            while not self._closing.is_set():
                try:
                    self._admit()
                    if self.active:
                        self._step()
                except Exception as e:  # a bad step must not take the server down
                    log.exception("serving step failed")
                    failed = list(self.active)
                    self.active.clear()  # rows free before the clients hear of it
                    for s in failed:
                        s.row = -1
                        s.sink(Event(s.index, finish_reason="error", error=str(e)))
        finally:
            for s in self.active:
                s.sink(Event(s.index, finish_reason="error", error="the server is shutting down"))
            while True:
                try:
                    s = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if s is not None:
                    s.sink(
                        Event(s.index, finish_reason="error", error="the server is shutting down")
                    )
            self._run(("stop",))

    def _admit(self) -> None:
        """Move waiting sequences into free rows, all that joined since the last step in one
        prefill; block while there is nothing to do."""
        joining: list[Sequence] = []
        while len(self.active) + len(joining) < self.max_batch and not self._closing.is_set():
            try:
                if self.active or joining:
                    s = self.waiting.get_nowait()
                else:
                    s = self.waiting.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                if not self.active and not joining:
                    self._run(("idle",))
                    continue
                break
            if s is None or s.cancelled:
                continue
            joining.append(s)
        if not joining:
            return
        first = len(self.active)
        for i, s in enumerate(joining):
            s.row = first + i
        try:
            logits = self._run(("prefill", first, [s.prompt for s in joining]))
        except Exception as e:  # not yet active: the loop's handler would not tell them
            for s in joining:
                s.row = -1
                s.sink(Event(s.index, finish_reason="error", error=str(e)))
            raise
        self.active.extend(joining)
        for s in joining:
            if self.speculate and s.params.greedy and s.params.repetition_penalty == 1.0:
                s.drafter, s.accept = NgramDrafter(s.prompt), Acceptance()
        tokens = self._sample(logits, joining, [len(s.prompt) for s in joining])
        done = [s for s, t in zip(joining, tokens) if self._advance(s, t)]
        if done:
            self._release(done)

    def _step(self) -> None:
        gone = [s for s in self.active if s.cancelled]  # their clients left: no event
        if gone:
            self._release(gone)
            if not self.active:
                return
        rows = self.active
        width, guesses = self._width(rows)
        positions = [s.length - 1 for s in rows]
        if width == 0:
            logits = self._run(("decode", [s.last for s in rows], positions))
            new = [[t] for t in self._sample(logits, rows, [s.length for s in rows])]
        else:
            new = self._check(rows, guesses, positions)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        done = []
        for s, tokens in zip(list(rows), new):
            for t in tokens:
                if self._advance(s, t):
                    done.append(s)
                    break
        if done:
            self._release(done)

    def _width(self, rows: list[Sequence]) -> tuple[int, list[list[int]]]:
        """Guesses per row for this step (0: a plain step) and each row's guesses, chosen as
        ``speculative_loop`` does from the greedy rows' n-gram drafts and kept rates."""
        if not self.speculate or not any(s.drafter for s in rows):
            return 0, []
        least = min(self.speculate, MIN_GUESSES_ONE_ROW) if len(rows) == 1 else 1
        return plan_pass(
            [s.drafter for s in rows],
            [s.accept for s in rows],
            self.speculate,
            self.rows_per_step,
            least,
        )

    def _check(
        self, rows: list[Sequence], guesses: list[list[int]], positions: list[int]
    ) -> list[list[int]]:
        """One pass feeding each row its last token and its guesses (no padding goes through
        the model): a greedy row keeps its guesses up to the first the
        model disagrees with, plus the model's token there; a sampling row draws its one token
        from the logits at its last token."""
        width = max(len(g) for g in guesses)
        fed = [[s.last, *g, *([s.last] * (width - len(g)))] for s, g in zip(rows, guesses)]
        sizes = [1 + len(g) for g in guesses]
        logits = self._run(("verify", fed, positions, sizes))  # [sum(sizes), V]
        ends = list(itertools.accumulate(sizes))
        flat = logits.argmax(dim=-1).tolist()
        choices = [flat[e - n : e] for e, n in zip(ends, sizes)]
        sampling = [i for i, s in enumerate(rows) if s.drafter is None]
        drawn = {}
        if sampling:
            firsts = torch.tensor([ends[i] - sizes[i] for i in sampling], device=logits.device)
            first = logits[firsts]  # [n, V]: each sampling row's only fed token
            picked = [rows[i] for i in sampling]
            drawn = dict(zip(sampling, self._sample(first, picked, [s.length for s in picked])))
        new = []
        for i, (s, g) in enumerate(zip(rows, guesses)):
            if s.drafter is None:
                new.append([drawn[i]])
                continue
            tokens, kept = settle(g, choices[i], s.accept)
            self.spec_stats["guessed"] += len(g)
            self.spec_stats["kept"] += kept
            new.append(tokens)
        self.spec_stats["checks"] += 1
        return new

    def _sample(self, logits: torch.Tensor, rows: list[Sequence], steps: list[int]) -> list[int]:
        """Next token of each row; rows are grouped by sampling options (``sample`` takes one
        set per call), each row drawing with its own key at its own position."""
        groups: dict[SamplingParams, list[int]] = {}
        for i, s in enumerate(rows):
            groups.setdefault(s.params, []).append(i)
        out = [0] * len(rows)
        device = logits.device
        for params, idx in groups.items():
            part = logits[torch.tensor(idx, device=device)] if len(idx) < len(rows) else logits
            if params.repetition_penalty != 1.0:
                seen = torch.zeros_like(part, dtype=torch.bool)  # [g, V]
                for j, i in enumerate(idx):
                    seen[j, torch.tensor(rows[i].prompt + rows[i].generated, device=device)] = True
                part = penalise_seen(part, seen, params.repetition_penalty)
            keys = None
            if not params.greedy:
                keys = torch.tensor([rows[i].key for i in idx], dtype=torch.long, device=device)
            step = torch.tensor([steps[i] for i in idx], dtype=torch.long, device=device)
            for i, t in zip(idx, sample(part, params, keys, step).tolist()):
                out[i] = t
        return out

    def _advance(self, s: Sequence, token: int) -> bool:
        """Take ``token`` for ``s``; send its new text; True when ``s`` is finished."""
        if token in self.stop_ids:
            return self._finish(s, "stop")
        s.generated.append(token)
        if s.drafter is not None:
            s.drafter.extend([token])
        delta, stopped = s.text.advance(s.generated)
        if delta:
            s.sink(Event(s.index, delta))
        if stopped:
            return self._finish(s, "stop")
        if s.length >= s.limit:
            return self._finish(s, "length")
        return False

    def _finish(self, s: Sequence, reason: str) -> bool:
        """Hold ``s``'s last event until ``_release`` has freed its row: a client that has its
        whole answer and then asks ``/health`` sees the row free."""
        s.final = Event(s.index, s.text.finish(), finish_reason=reason, tokens=len(s.generated))
        return True

    def _release(self, done: list[Sequence]) -> None:
        """Free the rows of ``done``; the last active row moves into each freed row so that the
        active rows stay 0..k-1. Then the finished ones get their last event (one whose row
        could not be freed stays active and gets the loop's error event instead)."""
        try:
            for s in sorted(done, key=lambda x: x.row, reverse=True):
                last = self.active[-1]
                if last is not s:
                    self._run(("move", last.row, s.row, min(last.length, self.executor.max_length)))
                    self.active[s.row] = last
                    last.row = s.row
                self.active.pop()
                s.row = -1
        finally:
            for s in done:
                if s.final is not None and s.row == -1:
                    s.sink(s.final)
                    s.final = None
