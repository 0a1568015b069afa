"""Greedy decoding that checks several guessed tokens per pass: n-gram (prompt-lookup) drafts.

One decoding step reads every weight once for a handful of rows (at gpt3-base, ~340 MB of fp32
per step on CPU), so feeding a row ``1 + k`` tokens costs little more than feeding it one. Text
repeats itself (names, numbers, phrases from the prompt, a model's own loops), so the tokens
that followed the last occurrence of a row's most recent n-gram are a cheap guess of what comes
next. ``speculative_loop`` feeds each row its last token plus up to ``k`` such guesses
(``FastDecoder.verify``), takes the model's greedy choice at every fed position, and keeps the
guesses up to the first one the model disagrees with, plus the model's own token there: every
pass yields at least one token and up to ``k + 1``. How many guesses a pass feeds (``choose_width``)
weighs each row's running rate of kept guesses against what a pass of more rows costs, so text
that does not repeat falls back to plain one-token steps.

The output is the greedy output: each kept token is the argmax of the logits at its position
given the kept tokens before it (the check computes those logits in one pass instead of one pass
per token; attention only reads slots up to each token's position, so rejected guesses change
nothing). Rows with no n-gram match in a batch where no row has one take a plain one-token step.
A check feeds each row only its own guesses (the linears skip the padding up to the pass's
width; ``FastDecoder.verify``'s ``counts``). Rows that finished leave the batch: in a batch
whose rows finish at different passes, the last rows' passes (often the widest, as a row that
keeps its guesses is fed more) would otherwise pay for every row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from megagpt.inference.decode import FastDecoder
from megagpt.model.matmul import cpu_vendor

# The longest and shortest suffix looked up: a 3-token match predicts better than a 1-token one;
# 1-token matches still pay off when the model repeats itself.
MAX_NGRAM = 3
MIN_NGRAM = 1
# The cost of a pass of r rows relative to a 1-row step is taken as 1 + (r - 1) / ROWS_PER_STEP:
# each row adds little while a pass is bound by reading the weights. At gpt3-base on one CPU
# thread, alone, 8 rows cost 1.47x a 1-row step, 16 rows 2.0x, 32 rows 3.1x (i.e. ~16); inside
# the decoding loop at batch 8, checking passes of 16-32 rows cost more than that model says
# (speculation at 16 was 10 % slower than plain steps, BENCHMARKS-generate.md), so the CPU figure
# is the conservative 8. On an Intel Xeon (Emerald Rapids, 2 threads) a batch-8 step cost
# 1.26x / 1.51x / 1.74x itself at 16 / 24 / 32 rows (i.e. ~14-17), and batch-8 decoding of 64
# tokens ran at a median 273 tok/s with 16 against 250 with 8 (5 rounds alternating): 16 there.
# A GPU reads the weights for many more rows at once.
ROWS_PER_STEP = {"cpu": 8, "cpu-intel": 16, "cuda": 128}


def rows_per_step(device: torch.device) -> int:
    """The cost model's ``rows_per_step`` for passes on ``device`` (ROWS_PER_STEP)."""
    if device.type == "cpu":
        return ROWS_PER_STEP["cpu-intel" if cpu_vendor() == "GenuineIntel" else "cpu"]
    return ROWS_PER_STEP.get(device.type, ROWS_PER_STEP["cuda"])


# Guesses a lone row feeds at least: oneDNN's CPU kernels took as long for 2 rows as for 4-5
# (and a 4-row pass as long as a 1-row step), so fewer guesses would not be cheaper.
MIN_GUESSES_ONE_ROW = 3


class NgramDrafter:
    """Guesses for one row: the tokens that followed the most recent earlier occurrence of the
    row's last ``n`` tokens (``n`` from ``max_n`` down to ``min_n``)."""

    def __init__(self, tokens: list[int], max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM):
        self.ctx: list[int] = []
        self.sizes = range(max_n, min_n - 1, -1)
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append tokens. The index holds every n-gram ending before the last token (where it
        ended, the latest occurrence): the suffix being looked up is never its own match."""
        for t in tokens:
            end = len(self.ctx) - 1
            if end >= 0:
                for n in self.sizes:
                    if end - n + 1 >= 0:
                        self.index[n][tuple(self.ctx[end - n + 1 : end + 1])] = end
            self.ctx.append(t)

    def propose(self, k: int) -> list[int]:
        """``k`` guessed next tokens (none when no suffix occurred before). A match that ends
        ``p`` tokens before the last one says the text may be repeating with period ``p``: the
        guesses continue that repetition past the end of the text (a loop of one token gets
        ``k`` guesses, not one)."""
        for n in self.sizes:
            if len(self.ctx) >= n:
                end = self.index[n].get(tuple(self.ctx[-n:]))
                if end is not None:
                    period = len(self.ctx) - 1 - end
                    return [self.ctx[len(self.ctx) - period + (i % period)] for i in range(k)]
        return []


class Acceptance:
    """A row's running estimate of the chance that its next guess is kept (each guess is
    checked only if those before it were kept; older checks count less)."""

    def __init__(self, prior: float = 0.5, weight: float = 2.0, decay: float = 0.8):
        self.prior, self.weight, self.decay = prior, weight, decay
        self.kept, self.tried = prior * weight, weight

    def update(self, offered: int, kept: int) -> None:
        """A check of ``offered`` guesses kept ``kept`` (then one failed, unless all were)."""
        self.kept = self.kept * self.decay + kept
        self.tried = self.tried * self.decay + kept + (kept < offered)

    def relax(self) -> None:
        """A pass that checked none of this row's guesses: the estimate drifts back towards the
        prior, so a row whose text starts repeating later is tried again."""
        self.kept = self.kept * self.decay + self.prior * self.weight * (1 - self.decay)
        self.tried = self.tried * self.decay + self.weight * (1 - self.decay)

    @property
    def rate(self) -> float:
        return self.kept / self.tried


def choose_width(
    rates: list[float], offered: list[int], k: int, rows_per_step: float, least: int = 1
) -> int:
    """Guesses to feed per row in the next pass (0: a plain step), the width with the most
    expected tokens per unit of cost. A row with acceptance rate ``a`` offering ``g`` guesses
    is fed 1 + min(w, g) tokens by a pass of width ``w`` (no padding: ``FastDecoder.verify``'s
    ``counts``) and is expected to yield 1 + a + a^2 + ... + a^min(w, g) tokens; a pass
    feeding r tokens in all costs 1 + (r - 1) / rows_per_step. Widths below ``least`` are not
    considered (except 0)."""

    def value(w: int) -> float:
        tokens = 0.0
        for a, g in zip(rates, offered):
            tokens += sum(a**j for j in range(min(w, g) + 1))
        fed = sum(1 + min(w, g) for g in offered)
        return tokens / (1 + (fed - 1) / rows_per_step)

    widths = [0, *range(max(1, least), k + 1)] if max(offered, default=0) else [0]
    return max(widths, key=value)


def plan_pass(
    drafters: list[NgramDrafter | None],
    accepts: list[Acceptance | None],
    k: int,
    rows_per_step: float,
    least: int = 1,
) -> tuple[int, list[list[int]]]:
    """(guesses per row for the next pass, each row's guesses cut to that width) for rows with
    a drafter (None: a row that does not speculate, e.g. one that samples: it offers no guess
    and counts as a row that keeps none). A plain pass (width 0) lets every estimate relax
    towards its prior."""
    guesses = [d.propose(k) if d is not None else [] for d in drafters]
    width = 0
    if any(guesses):
        rates = [a.rate if a is not None else 0.0 for a in accepts]
        offered = [len(g) for g in guesses]
        width = choose_width(rates, offered, k, rows_per_step, least)
    if width == 0:
        for a in accepts:
            if a is not None:
                a.relax()
    return width, [g[:width] for g in guesses]


def settle(
    guess: list[int], choices: list[int], accept: Acceptance | None
) -> tuple[list[int], int]:
    """A checked row's new tokens: its guesses up to the first one the model's choices (its
    greedy token at each fed position) disagree with, plus the model's token there; and how
    many guesses were kept. Updates the row's acceptance estimate when it offered guesses."""
    kept = 0
    while kept < len(guess) and guess[kept] == choices[kept]:
        kept += 1
    if guess and accept is not None:
        accept.update(len(guess), kept)
    return choices[: kept + 1], kept


def speculative_loop(
    dec: FastDecoder,
    tokens: torch.Tensor,
    prompt_lengths: list[int],
    limits: list[int],
    stop_ids: list[int],
    vocab_size: int,
    max_position: int,
    k: int,
    stats: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Greedy decoding of right-padded prompts ``tokens`` [b, T] (T = the longest limit) with
    n-gram drafts of up to ``k`` tokens; yields (tokens, ends, done) after every pass, updated
    in place, as ``TextGenerator.steps`` does. Rows that finished (a stop token, their limit)
    leave the cache (``dec.keep_rows``) and every later pass. ``stats`` (optional) receives
    the counts of passes, checking passes, guesses fed and guesses kept."""
    device = tokens.device
    b, total = tokens.shape
    stop = set(stop_ids)
    host = tokens.cpu()
    rows = [NgramDrafter(host[i, :n].tolist()) for i, n in enumerate(prompt_lengths)]
    ends = list(prompt_lengths)  # tokens each row holds (without a stop token)
    done = [False] * b
    accept = [Acceptance() for _ in range(b)]
    per_step = rows_per_step(device)
    uniform = len(set(prompt_lengths)) == 1
    longest = max(prompt_lengths)
    lengths = torch.tensor(prompt_lengths, device=device)
    # k spare slots: a row near its limit is still fed k guesses (their results are dropped).
    cache = dec.new_cache(b, total + k, zeroed=True)
    dec.begin()
    local = dec.prefill(tokens[:, :longest], None if uniform else lengths, cache)
    chosen = dec.greedy(local, vocab_size).view(b, 1).tolist()  # the first new token per row
    counts = {"passes": 1, "checks": 0, "guessed": 0, "kept": 0}
    ends_t = torch.empty(b, dtype=torch.long, device=device)
    done_t = torch.empty(b, dtype=torch.bool, device=device)
    live = list(range(b))  # the rows still decoding, in the order of the cache's rows
    while True:
        for j, i in enumerate(live):  # keep each row's new tokens, to its limit and first stop
            new = chosen[j][: limits[i] - ends[i]]
            cut = next((t for t, token in enumerate(new) if token in stop), None)
            if cut is not None:
                new, done[i] = new[:cut], True
            if new:
                tokens[i, ends[i] : ends[i] + len(new)] = torch.tensor(new, device=device)
                rows[i].extend(new)
                ends[i] += len(new)
            done[i] = done[i] or ends[i] >= limits[i]
        ends_t.copy_(torch.tensor(ends))
        done_t.copy_(torch.tensor(done))
        yield tokens, ends_t, done_t
        if all(done):
            break
        # Finished rows leave the passes: a pass costs about its number of rows (more so for
        # checking passes, bound by arithmetic), and the cost model prices the live rows only.
        keep = [j for j, i in enumerate(live) if not done[i]]
        if len(keep) < len(live):
            cache = dec.keep_rows(cache, torch.tensor(keep, device=device))
            live = [live[j] for j in keep]
        # Each row's last token is at slot ends[i] - 1 (not yet in the cache).
        last = [rows[i].ctx[-1] for i in live]
        least = min(k, MIN_GUESSES_ONE_ROW) if len(live) == 1 else 1
        width, guesses = plan_pass(
            [rows[i] for i in live], [accept[i] for i in live], k, per_step, least
        )
        counts["passes"] += 1
        live_ends = [ends[i] for i in live]
        n = len(live)
        if width == 0:
            ids = torch.tensor(last, device=device)
            if uniform and len(set(live_ends)) == 1:
                local = dec.step(ids, live_ends[0] - 1, cache)
            else:
                pos = torch.tensor([e - 1 for e in live_ends], device=device)
                local = dec.step(ids, pos, cache, span=max(live_ends))
            chosen = dec.greedy(local, vocab_size).view(n, 1).tolist()
            continue
        # Each row is fed its last token and its own guesses; the rest of its row is padding
        # that the linears skip (verify's counts).
        width = max(len(g) for g in guesses)
        fed = [[t, *g, *([t] * (width - len(g)))] for t, g in zip(last, guesses)]
        sizes = [1 + len(g) for g in guesses]
        start = torch.tensor([e - 1 for e in live_ends], device=device)
        local = dec.verify(
            torch.tensor(fed, device=device),
            start,
            cache,
            span=max(live_ends) + width,
            max_position=max_position,
            counts=torch.tensor(sizes, device=device),
        )
        flat = dec.greedy(local, vocab_size).tolist()  # one per fed token, row after row
        model = [flat[a - m : a] for a, m in zip(itertools.accumulate(sizes), sizes)]
        counts["checks"] += 1
        chosen = []
        for j, i in enumerate(live):
            new, kept = settle(guesses[j], model[j], accept[i])
            chosen.append(new)
            counts["guessed"] += len(guesses[j])
            counts["kept"] += kept
    if stats is not None:
        stats.update(counts)
