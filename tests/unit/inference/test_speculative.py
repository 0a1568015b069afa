"""Greedy decoding with n-gram drafts (megagpt/inference/speculative.py): the drafter's guesses,
the loop's bookkeeping on a model whose greedy output is known, and the real model's tokens with
and without speculation."""

from __future__ import annotations

import pytest
import torch

from megagpt.inference.generate import TextGenerator
from megagpt.inference.sampling import make_params
from megagpt.inference.speculative import (
    Acceptance,
    NgramDrafter,
    choose_width,
    plan_pass,
    settle,
    speculative_loop,
)

GREEDY = make_params(top_k=1)


def test_drafter_continues_the_latest_occurrence_of_the_longest_suffix():
    d = NgramDrafter([1, 2, 3, 9, 5, 2, 3, 7, 8, 4, 2, 3])
    # suffix (2, 3) last occurred at 5..6, followed by 7 8 4 2 3
    assert d.propose(4) == [7, 8, 4, 2]
    d.extend([7])
    # (2, 3, 7) occurred at 5..7: followed by 8 4 2 3 7
    assert d.propose(3) == [8, 4, 2]


def test_drafter_extends_a_repetition_past_the_end_of_the_text():
    assert NgramDrafter([5, 6, 6, 6]).propose(5) == [6, 6, 6, 6, 6]
    assert NgramDrafter([1, 4, 7, 4, 7]).propose(5) == [4, 7, 4, 7, 4]


def test_drafter_never_matches_the_suffix_with_itself():
    assert NgramDrafter([1, 2, 3]).propose(4) == []
    assert NgramDrafter([]).propose(4) == []
    assert NgramDrafter([8]).propose(2) == []


def test_width_weighs_kept_guesses_against_the_cost_of_more_rows():
    # a lone row that keeps most guesses checks many; one that keeps few takes plain steps
    assert choose_width([0.9], [7], 7, rows_per_step=16) == 7
    assert choose_width([0.05], [7], 7, rows_per_step=16) == 0
    # eight rows: a wide pass costs real work on a CPU, not on a GPU
    rates, offered = [0.6] * 8, [7] * 8
    cpu, gpu = choose_width(rates, offered, 7, 16), choose_width(rates, offered, 7, 128)
    assert 0 < cpu < gpu
    assert choose_width([0.9, 0.9], [0, 0], 7, 16) == 0  # nothing to check
    assert choose_width([0.3], [7], 7, 16, least=3) in (0, 3, 4, 5, 6, 7)


def test_a_pass_is_priced_by_the_tokens_it_feeds():
    """Rows that offer fewer guesses than the width (or none) are fed only theirs, so they add
    1 + their guesses to a pass's cost, not 1 + width: one good row among seven without guesses
    is worth checking (priced as padded to 8 x 8 tokens it would not be: width 0), and two good
    rows beside two without guesses check wider than four good rows."""
    assert choose_width([0.9] + [0.3] * 7, [7] + [0] * 7, 7, 16) == 7
    assert choose_width([0.8, 0.8, 0.0, 0.0], [7, 7, 0, 0], 7, 16) == 5
    assert choose_width([0.8] * 4, [7] * 4, 7, 16) == 4


def test_acceptance_estimate_follows_checks_and_relaxes_to_the_prior():
    a = Acceptance()
    for _ in range(6):
        a.update(4, 0)
    low = a.rate
    assert low < 0.2
    for _ in range(10):
        a.relax()
    assert low < a.rate < 0.5
    for _ in range(6):
        a.update(4, 4)
    assert a.rate > 0.8


def test_settle_keeps_guesses_up_to_the_first_disagreement():
    a = Acceptance()
    assert settle([5, 6, 7], [5, 6, 9, 4], a) == ([5, 6, 9], 2)
    assert settle([5, 6], [5, 6, 8], a) == ([5, 6, 8], 2)  # all kept, plus the model's next
    assert settle([5], [3, 1], a) == ([3], 0)
    before = a.rate
    assert settle([], [3], a) == ([3], 0) and a.rate == before  # no guess: no evidence


def test_a_pass_is_planned_for_drafting_rows_and_others_count_as_keeping_nothing():
    looping = NgramDrafter([1, 2, 3, 1, 2, 3, 1, 2])  # repeats: guesses 3, 1, 2, ...
    good = Acceptance()
    for _ in range(5):
        good.update(4, 4)
    width, guesses = plan_pass([looping, None], [good, None], 4, rows_per_step=16)
    assert width == 4 and guesses == [[3, 1, 2, 3], []]
    # nothing to guess: a plain pass, and the estimates relax towards the prior
    fresh = NgramDrafter([1, 2, 3])
    rate = good.rate
    assert plan_pass([fresh], [good], 4, rows_per_step=16) == (0, [[]])
    assert good.rate < rate


class ChainModel:
    """A stand-in for FastDecoder over a model whose greedy choice after token t is
    ``nxt[t]`` whatever came before: checks the loop's positions and bookkeeping, not the
    attention. It records each pass's rows."""

    def __init__(self, nxt: list[int]):
        self.nxt = torch.tensor(nxt)
        self.vocab = len(nxt)
        self.passes: list[int] = []
        self.checks: list[tuple[int, int]] = []  # (tokens fed, rows x width of the grid)
        self.rows = 0  # rows in the "cache"

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.nxt[ids.reshape(-1)], self.vocab).float()

    def new_cache(self, b, length, zeroed=False):
        self.rows = b
        return None

    def keep_rows(self, cache, rows):
        assert rows.tolist() == sorted(set(rows.tolist())) and int(rows.max()) < self.rows
        self.rows = rows.numel()
        return cache

    def begin(self):
        pass

    def prefill(self, tokens, lengths, cache):
        b = tokens.shape[0]
        last = tokens[:, -1] if lengths is None else tokens[torch.arange(b), lengths - 1]
        self.passes.append(b)
        return self.logits(last)

    def step(self, ids, position, cache, span=None):
        assert ids.shape[0] == self.rows
        self.passes.append(ids.shape[0])
        return self.logits(ids)

    def verify(self, ids, start, cache, span, max_position, counts=None):
        assert span > int(start.max()) + ids.shape[1] - 1  # every fed slot is readable
        assert ids.shape[0] == start.shape[0] == self.rows
        grid = ids.numel()
        if counts is not None:  # row r's first counts[r] tokens only, row after row
            assert int(counts.max()) == ids.shape[1] and int(counts.min()) >= 1
            ids = torch.cat([row[:n] for row, n in zip(ids, counts.tolist())])
        self.passes.append(ids.numel())
        self.checks.append((ids.numel(), grid))
        return self.logits(ids)

    def greedy(self, local, vocab_size):
        return local[:, :vocab_size].argmax(dim=-1)


def chain(nxt, first, n):
    out = [first]
    for _ in range(n):
        out.append(nxt[out[-1]])
    return out


def run(model, prompts, limits, stop_ids=(), k=4):
    total = max(limits)
    tokens = torch.zeros(len(prompts), total, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    stats: dict = {}
    *_, (toks, ends, done) = speculative_loop(
        model,
        tokens,
        [len(p) for p in prompts],
        limits,
        list(stop_ids),
        model.vocab,
        10_000,
        k,
        stats,
    )
    return [toks[i, : ends[i]].tolist() for i in range(len(prompts))], done.tolist(), stats


# 0 -> 1 -> 2 -> 0 (a loop of 3), 3 -> 4 -> 5 -> 6 -> 3 (a loop of 4), 7 -> 7
NEXT = [1, 2, 0, 4, 5, 6, 3, 7]


def test_loop_gives_the_greedy_chain_with_fewer_passes():
    model = ChainModel(NEXT)
    prompts = [[0, 1], [3, 4, 5, 6, 3], [7]]
    limits = [len(p) + 20 for p in prompts]
    out, done, stats = run(model, prompts, limits)
    assert out == [p[:-1] + chain(NEXT, p[-1], 20) for p in prompts]
    assert all(done)
    assert stats["kept"] > 0 and stats["passes"] < 20  # guesses were kept
    assert stats["passes"] == len(model.passes)


def test_loop_stops_at_stop_tokens_and_limits_mid_pass():
    model = ChainModel(NEXT)
    prompts = [[3, 4, 5, 6, 3, 4], [0, 1, 2, 0], [7, 7]]
    limits = [30, 11, 5]
    out, done, _ = run(model, prompts, limits, stop_ids=[6], k=7)
    assert out[0] == [3, 4, 5, 6, 3, 4, 5]  # the stop token 6 ends the row, not returned
    assert out[1] == [0, 1, 2, 0] + chain(NEXT, 0, 7)[1:]  # exactly to its limit (11)
    assert out[2] == [7, 7, 7, 7, 7]
    assert done == [True, True, True]


def test_finished_rows_leave_the_passes():
    """Once a row reaches its limit or a stop token, later passes feed only the others: a
    pass's cost grows with its rows, and the last rows' passes are often the widest."""
    model = ChainModel(NEXT)
    prompts = [[0, 1], [3, 4, 5, 6, 3], [7], [0, 1, 2]]
    limits = [4, 30, 12, 6]
    out, done, stats = run(model, prompts, limits, stop_ids=[2], k=3)
    assert out == [[0, 1], [3, 4, 5, 6, 3] + chain(NEXT, 3, 25)[1:], [7] * 12, [0, 1, 2, 0, 1]]
    assert all(done)
    # Rows 0 and 3 stop at token 2 (row 0 at once), row 2 at its limit; row 1 ends alone.
    assert model.rows == 1
    assert model.passes[0] == 4 and model.passes[-1] <= 1 + 3  # one row, up to 3 guesses
    assert stats["passes"] == len(model.passes)


def test_a_check_feeds_each_row_only_its_own_guesses():
    """A row that repeats itself next to one whose text does not: checking passes feed the
    first its guesses and the second its last token alone, not padding up to the width."""
    nxt = NEXT + [*range(9, 41), 8]  # 8 -> 9 -> ... -> 40 -> 8: nothing repeats for 33 tokens
    model = ChainModel(nxt)
    out, _, stats = run(model, [[7, 7, 7], [8]], [23, 13], k=4)
    assert out == [[7] * 23, chain(nxt, 8, 12)]
    assert stats["checks"] > 0
    # Until row 0 finishes, each check feeds 1 + width and 1 tokens, on a grid of 2 x (1 + width).
    mixed = [(fed, grid) for fed, grid in model.checks if grid % 2 == 0 and grid > 2]
    assert mixed and all(fed == grid // 2 + 1 for fed, grid in mixed)


def test_text_that_does_not_repeat_takes_plain_steps():
    model = ChainModel(list(range(1, 40)) + [0])  # one long cycle: nothing repeats early
    out, _, stats = run(model, [[0]], [12])
    assert out == [chain(model.nxt.tolist(), 0, 11)]
    assert stats["checks"] == 0 and stats["passes"] == 11  # one per new token


# -- the real (tiny) model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen(pipe):
    return pipe.generator


def twin(gen, **kw) -> TextGenerator:
    kw.setdefault("stop_ids", [])
    return TextGenerator(
        gen.model,
        vocab_size=gen.vocab_size,
        max_positions=gen.max_positions,
        pad_id=gen.pad_id,
        **kw,
    )


@pytest.fixture(scope="module")
def ids(pipe):
    texts = ["床前明月光，疑是地上霜。床前明月光，", "北京", "中华人民共和国中华人民", "举头望明月"]
    return [pipe.tokenizer.encode(t) for t in texts]


def test_greedy_tokens_equal_plain_decoding(gen, ids):
    assert gen.speculate > 0  # on by default
    spec, plain = twin(gen), twin(gen, speculate=0)
    ref = twin(gen, fast=False)
    for batch in ([ids[0]], [ids[1]], ids):
        want = plain.generate(batch, GREEDY, max_new_tokens=24)
        assert spec.generate(batch, GREEDY, max_new_tokens=24) == want
        assert ref.generate(batch, GREEDY, max_new_tokens=24) == want
        assert spec.last_stats["checks"] > 0


def test_stop_tokens_and_row_limits_with_speculation(gen, ids):
    free = twin(gen, speculate=0).generate(ids, GREEDY, max_new_tokens=16)
    stops = [free[0][0][len(ids[0]) + 3]]
    limits = [len(p) + n for p, n in zip(ids, (16, 5, 9, 13))]
    plain_state = list(twin(gen, stop_ids=stops, speculate=0).steps(ids, GREEDY, limits))[-1]
    spec_state = list(twin(gen, stop_ids=stops).steps(ids, GREEDY, limits))[-1]
    assert spec_state.ends.tolist() == plain_state.ends.tolist()
    assert spec_state.done.tolist() == plain_state.done.tolist() == [True] * len(ids)
    for i in range(len(ids)):
        assert spec_state.row(i) == plain_state.row(i)
        assert len(plain_state.row(i)) <= limits[i]
    assert len(spec_state.row(0)) < limits[0]  # the stop token cut row 0


def test_sampling_and_penalties_do_not_speculate(gen, ids):
    spec = twin(gen)
    spec.generate([ids[0]], make_params(top_p=0.9, temperature=1.2), max_new_tokens=6, seed=1)
    assert spec.last_stats == {}
    spec.generate([ids[0]], make_params(top_k=1, repetition_penalty=1.5), max_new_tokens=6)
    assert spec.last_stats == {}
    with pytest.raises(ValueError, match="speculate must be >= 0"):
        twin(gen, speculate=-1)


def test_the_cost_model_follows_the_device_and_the_cpu(monkeypatch):
    """Passes of more rows are cheaper on an Intel CPU than the AMD figure assumes (measured:
    16 rows per step-cost there against 8), much cheaper on a GPU; the engine and the loop
    read the same figure."""
    from megagpt.inference import speculative

    monkeypatch.setattr(speculative, "cpu_vendor", lambda: "AuthenticAMD")
    assert speculative.rows_per_step(torch.device("cpu")) == 8
    monkeypatch.setattr(speculative, "cpu_vendor", lambda: "GenuineIntel")
    assert speculative.rows_per_step(torch.device("cpu")) == 16
    assert speculative.rows_per_step(torch.device("cuda")) == 128
    # Eight rows keeping 3 of 4 guesses: cheaper passes make wider checks worth it.
    rates, offered = [0.75] * 8, [3] * 8
    assert choose_width(rates, offered, 3, 8) < choose_width(rates, offered, 3, 16)
