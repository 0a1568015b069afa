"""The scheduler itself: requests join and leave between steps, and a client that goes away
frees its row."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from megagpt.inference.sampling import SamplingParams
from megagpt.serving.app import Service
from tests.unit.inference.test_decode_loop import twin

GREEDY = SamplingParams(top_k=1, top_p=0.0)


def submit(server, pipe, prompt: str, new_tokens: int, log: list, done: threading.Event):
    """One greedy sequence on the test server's engine; its events go to ``log``."""
    service = Service(server.engine, pipe.tokenizer, "tiny")
    ids = pipe.tokenizer.encode(prompt)

    def sink(event):  # on the engine thread
        # At the last event: how many rows are busy (this one's freed before its last event).
        busy = len(server.engine.active) if event.finish_reason else None
        log.append((prompt, event, server.engine.steps, busy))
        if event.finish_reason:
            done.set()

    (seq,) = service.sequences([ids], [len(ids) + new_tokens], GREEDY, 1, None, (), sink)
    server.engine.submit([seq])
    return seq


def test_a_request_joins_and_leaves_while_another_decodes(server, pipe, monkeypatch):
    log: list = []
    long_done, short_done = threading.Event(), threading.Event()
    # The long request's 40 tokens take ~0.1 s: a test thread that a busy machine leaves
    # waiting that long would submit the short one after the long one finished. So, once the
    # long one has 5 tokens, its steps wait for the short one's submission: the short one
    # then joins mid-decode whenever this thread gets to run, and the order below is the
    # scheduler's, not the threads' timing.
    executor, submitted = server.engine.executor, threading.Event()
    run = executor.run

    def held_run(op):  # on the engine thread, which owns ``active``
        if op[0] in ("decode", "verify") and not submitted.is_set():
            rows = server.engine.active
            if rows and len(rows[0].generated) >= 5:
                submitted.wait(60)
        return run(op)

    monkeypatch.setattr(executor, "run", held_run)
    long = submit(server, pipe, "床前明月光", 40, log, long_done)
    try:
        while len(long.generated) < 5:  # the long request is decoding
            time.sleep(0.005)
        short = submit(server, pipe, "北京", 3, log, short_done)
    finally:
        submitted.set()
    assert short_done.wait(60) and long_done.wait(60)
    finished = [(p, steps, busy) for p, e, steps, busy in log if e.finish_reason]
    # The short one joined mid-decode and finished first, while the long one went on.
    assert [p for p, _, _ in finished] == ["北京", "床前明月光"]
    assert finished[0][1] < finished[1][1]
    assert len(long.generated) == 40 and len(short.generated) == 3
    # A finished request's last event leaves after its row is freed: a client that has its
    # whole answer sees its row free (the short one finished while the long one held a row).
    assert [busy for _, _, busy in finished] == [1, 0]
    assert long.row == short.row == -1 and not server.engine.active


def test_a_client_that_leaves_frees_its_row(server, monkeypatch):
    executor = server.engine.executor
    run, steps = executor.run, []

    # 50 ms per step, checking passes (n-gram guesses) included: decoded to the end, the request
    # takes ~50 steps (2.5 s); here it is dropped after 2-3. The server notices the closed
    # connection on its event loop thread, which a busy machine can keep waiting for a good
    # part of a second: 30 steps leave it 1.5 s.
    def slow_run(op):
        if op[0] in ("decode", "verify"):
            steps.append(len(op[1]))
            time.sleep(0.05)
        return run(op)

    monkeypatch.setattr(executor, "run", slow_run)
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        timeout=60,
        json={"prompt": "春眠不觉晓", "max_tokens": 55, "stream": True, "temperature": 0},
    ) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # The connection closed after one chunk: the sequence is dropped, not decoded to the end.
    deadline = time.monotonic() + 30
    while server.engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.engine.active
    assert len(steps) < 30, "the abandoned request was decoded on"
    assert httpx.get(f"{server.url}/health").json()["active"] == 0


def test_sixteen_sequences_give_one_at_a_time_tokens(server, pipe):
    """Token for token (not only text): 16 greedy sequences of different prompt and output
    lengths through 4 rows equal TextGenerator's one-at-a-time greedy decoding."""
    from tests.unit.serving.test_server import PROMPTS

    log: list = []
    events = [threading.Event() for _ in PROMPTS]
    lengths = [3 + (i * 7) % 17 for i in range(len(PROMPTS))]
    seqs = [submit(server, pipe, p, n, log, e) for p, n, e in zip(PROMPTS, lengths, events)]
    assert all(e.wait(120) for e in events)
    for prompt, n, seq in zip(PROMPTS, lengths, seqs):
        ids = pipe.tokenizer.encode(prompt)
        (want,) = pipe.generator.generate([ids], GREEDY, max_new_tokens=n)[0]
        assert seq.generated == want[len(ids) :], prompt


def test_a_failing_step_is_a_500_and_the_loop_goes_on(server, monkeypatch):
    executor = server.engine.executor
    run, failed = executor.run, []

    def failing_run(op):  # the first decode step fails (as an out-of-memory would)
        if op[0] == "decode" and not failed:
            failed.append(op)
            raise RuntimeError("injected step failure")
        return run(op)

    monkeypatch.setattr(executor, "run", failing_run)
    body = {"prompt": "北京", "max_tokens": 5, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 500, r.text
    assert "injected step failure" in r.json()["error"]["message"] and failed
    assert not server.engine.active
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    # Each reply (the error too) leaves after its row is freed.
    assert server.engine.alive and not server.engine.active


def _run_engine(generator, tokenizer, jobs, max_batch=4, queued=False, ops=None):
    """Decode ``jobs`` ((prompt, new tokens, sampling params, seed) each) on an Engine over
    ``generator`` (no HTTP), all submitted at once through ``max_batch`` rows (``queued``: before
    the scheduler starts); ``ops`` (a list) receives every executor operation. -> (each job's
    tokens, the engine)."""
    from megagpt.serving.engine import Engine

    engine = Engine(generator, max_batch)
    if ops is not None:
        run = engine.executor.run

        def recording_run(op):
            ops.append(op)
            return run(op)

        engine.executor.run = recording_run
    service = Service(engine, tokenizer, "tiny")
    events, seqs = [], []
    for prompt, n, params, seed in jobs:
        ids = tokenizer.encode(prompt)
        event = threading.Event()

        def sink(e, event=event):
            if e.finish_reason:
                event.set()

        (seq,) = service.sequences([ids], [len(ids) + n], params, 1, seed, (), sink)
        events.append(event)
        seqs.append(seq)
    if queued:
        engine.submit(seqs)
    engine.start()
    try:
        if not queued:
            engine.submit(seqs)
        assert all(e.wait(120) for e in events)
    finally:
        engine.close()
    return [s.generated for s in seqs], engine


def _engine_tokens(generator, tokenizer, prompts, lengths, params, seed=None):
    """Every prompt with the same sampling params (and seed) through ``_run_engine``."""
    jobs = [(p, n, params, seed) for p, n in zip(prompts, lengths)]
    return _run_engine(generator, tokenizer, jobs)


def test_the_engine_decodes_with_the_fast_path_and_the_reference_forward_alike(pipe, monkeypatch):
    """The executor decodes with the generator's FastDecoder (packed weights, a prefill written
    into its row's slot, per-row positions in one step); with ``fast=False`` it falls back to
    the model's forward over a SlotCache. Both give, token for token, one-at-a-time greedy
    decoding, and sampled rows (a seed) the same tokens on both paths."""
    from megagpt.inference.decode import FastDecoder
    from tests.unit.serving.test_server import PROMPTS

    gen = pipe.generator
    reference = twin(gen, fast=False)
    steps = []
    real_step = FastDecoder.step

    def counting_step(self, ids, position, cache, span=None):
        steps.append(ids.shape[0])
        return real_step(self, ids, position, cache, span)

    monkeypatch.setattr(FastDecoder, "step", counting_step)
    lengths = [3 + (i * 7) % 17 for i in range(len(PROMPTS))]
    fast, engine = _engine_tokens(gen, pipe.tokenizer, PROMPTS, lengths, GREEDY)
    assert engine.executor.decoder is not None and steps and max(steps) == 4
    n_fast = len(steps)
    slow, engine = _engine_tokens(reference, pipe.tokenizer, PROMPTS, lengths, GREEDY)
    assert engine.executor.decoder is None and len(steps) == n_fast  # no FastDecoder step
    for prompt, n, a, b in zip(PROMPTS, lengths, fast, slow):
        ids = pipe.tokenizer.encode(prompt)
        (want,) = gen.generate([ids], GREEDY, max_new_tokens=n)[0]
        assert a == b == want[len(ids) :], prompt
    sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.95)
    a, _ = _engine_tokens(gen, pipe.tokenizer, PROMPTS[:6], lengths[:6], sampled, seed=7)
    b, _ = _engine_tokens(reference, pipe.tokenizer, PROMPTS[:6], lengths[:6], sampled, seed=7)
    assert a == b and any(x != y for x, y in zip(a, fast[:6]))


@pytest.fixture(scope="module")
def looping_pipe(tmp_path_factory):
    """The generation tests' tiny model: its greedy choice follows the last token alone, so
    its text soon repeats (what n-gram guesses need; the serving model's does not)."""
    from megagpt import pipeline
    from tests.unit.inference.conftest import shared_assets

    model = shared_assets(tmp_path_factory)["model"]
    return pipeline("text-generation", model=model, device="cpu")


def test_greedy_rows_check_guesses_and_keep_one_at_a_time_tokens(looping_pipe, monkeypatch):
    """With speculation on (the generator's default), greedy rows whose text repeats are fed
    n-gram guesses several per step: fewer steps than tokens, guesses kept, and token for token
    the output of one-at-a-time greedy decoding without speculation; a sampling row sharing
    the batch draws what it draws alone. ``speculate=0`` takes one token per step."""
    pipe = looping_pipe
    gen = pipe.generator
    assert gen.speculate > 0
    plain = twin(gen, speculate=0)
    prompts = ["床前明月光床前明月光床前明月光", "北京北京北京北京", "上海的天气", "山山山山山山"]
    lengths = [40, 33, 12, 45]
    got, engine = _engine_tokens(gen, pipe.tokenizer, prompts, lengths, GREEDY)
    stats = engine.spec_stats
    assert stats["checks"] > 0 and stats["kept"] > 0, stats
    assert engine.steps < sum(len(g) for g in got) / 2 + len(prompts)
    for prompt, n, tokens in zip(prompts, lengths, got):
        ids = pipe.tokenizer.encode(prompt)
        (want,) = plain.generate([ids], GREEDY, max_new_tokens=n)[0]
        assert tokens == want[len(ids) :], prompt
    off, engine = _engine_tokens(plain, pipe.tokenizer, prompts, lengths, GREEDY)
    assert off == got and engine.spec_stats["checks"] == 0

    # A sampling row decoded with greedy rows that speculate: its tokens are its own, and
    # the checks feed it its last token alone, not padding up to the greedy rows' width.
    from megagpt.inference.decode import FastDecoder

    sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.95)
    alone, _ = _engine_tokens(gen, pipe.tokenizer, ["春眠不觉晓"], [30], sampled, seed=3)
    checks = []
    real_verify = FastDecoder.verify

    def spy(self, ids, start, cache, span, max_position, counts=None):
        checks.append((ids.shape, None if counts is None else counts.tolist()))
        return real_verify(self, ids, start, cache, span, max_position, counts)

    monkeypatch.setattr(FastDecoder, "verify", spy)
    jobs = [(p, 40, GREEDY, None) for p in prompts[:2]] + [("春眠不觉晓", 30, sampled, 3)]
    mixed, engine = _run_engine(gen, pipe.tokenizer, jobs)
    assert mixed[-1] == alone[0] and engine.spec_stats["checks"] > 0
    assert checks and all(counts is not None for _, counts in checks)
    with_sampling = [(shape, c) for shape, c in checks if shape[0] == 3]
    assert with_sampling and all(c[2] == 1 < shape[1] for shape, c in with_sampling)


@pytest.mark.parametrize("fast", [True, False])
def test_requests_waiting_together_are_prefilled_in_one_pass(pipe, fast):
    """Ten requests waiting when the scheduler starts, 4 rows: the first four (prompts of
    different lengths) join in one prefill, later ones as rows free up, several at a time when
    they free together; every sequence's tokens equal one-at-a-time greedy decoding."""
    from tests.unit.serving.test_server import PROMPTS

    gen = pipe.generator if fast else twin(pipe.generator, fast=False)
    prompts, lengths = PROMPTS[:10], [6, 6, 6, 6, 9, 3, 12, 5, 5, 7]
    ops: list = []
    jobs = [(p, n, GREEDY, None) for p, n in zip(prompts, lengths)]
    got, _ = _run_engine(gen, pipe.tokenizer, jobs, queued=True, ops=ops)
    prefills = [op for op in ops if op[0] == "prefill"]
    assert prefills[0][1] == 0 and len(prefills[0][2]) == 4  # rows 0-3, one pass
    assert len({len(p) for p in prefills[0][2]}) > 1  # ragged prompts
    assert sum(len(op[2]) for op in prefills) == 10 and len(prefills) < 10
    for prompt, n, tokens in zip(prompts, lengths, got):
        ids = pipe.tokenizer.encode(prompt)
        (want,) = pipe.generator.generate([ids], GREEDY, max_new_tokens=n)[0]
        assert tokens == want[len(ids) :], prompt


def test_a_failing_prefill_ends_every_joining_request_and_the_engine_goes_on(pipe):
    """Three requests waiting together, their one prefill fails (as an out-of-memory would):
    each gets an "error" event naming the failure, no row stays taken, and the next requests
    decode as usual."""
    from megagpt.serving.engine import Engine

    engine = Engine(pipe.generator, 4)
    run, failed = engine.executor.run, []

    def failing_run(op):
        if op[0] == "prefill" and not failed:
            failed.append(len(op[2]))
            raise RuntimeError("injected prefill failure")
        return run(op)

    engine.executor.run = failing_run
    service = Service(engine, pipe.tokenizer, "tiny")
    finals: dict = {}
    events = {}

    def sequence(prompt):
        ids = pipe.tokenizer.encode(prompt)
        events[prompt] = threading.Event()

        def sink(e):
            if e.finish_reason:
                finals[prompt] = e
                events[prompt].set()

        return service.sequences([ids], [len(ids) + 5], GREEDY, 1, None, (), sink)[0]

    first = [sequence(p) for p in ("北京", "上海的天气", "长江")]
    engine.submit(first)  # queued before the scheduler starts: one prefill for all three
    engine.start()
    try:
        assert all(events[p].wait(60) for p in ("北京", "上海的天气", "长江"))
        assert failed == [3]
        for p in ("北京", "上海的天气", "长江"):
            assert finals[p].finish_reason == "error"
            assert "injected prefill failure" in finals[p].error
        assert not engine.active and all(s.row == -1 for s in first)
        later = sequence("山")
        engine.submit([later])
        assert events["山"].wait(60) and finals["山"].finish_reason == "length"
        assert len(later.generated) == 5 and engine.alive
    finally:
        engine.close()
