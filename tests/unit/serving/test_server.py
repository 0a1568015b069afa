"""`megagpt serve` over real HTTP: OpenAI completions (plain, streamed, n copies, stop
strings), continuous batching against one-at-a-time decoding, models, health, the pipeline's
``{"text"}`` endpoint, and errors that leave the server serving."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.unit.serving.conftest import MODEL_NAME

PROMPTS = [
    "中华人民共和国",
    "床前明月光，疑是地上霜。",
    "北京",
    "上海的天气",
    "我们",
    "山",
    "春眠不觉晓",
    "人工智能",
    "今天",
    "大学",
    "他说",
    "河水",
    "白日依山尽",
    "长江",
    "小明",
    "历史上",
]


def complete(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, **body) -> list[dict]:
    """The parsed ``data:`` chunks of a streamed completion (``[DONE]`` checked, dropped)."""
    chunks = []
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        timeout=120,
        json={"model": MODEL_NAME, "stream": True, **body},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for e in events[:-2]:
        assert e.startswith(b"data: ")
        chunks.append(json.loads(e[len(b"data: ") :].decode("utf-8")))  # strict UTF-8
    return chunks


def expected(pipe, prompt: str, **kw) -> str:
    """The pipeline's continuation (one prompt at a time), without the prompt."""
    ids = pipe.tokenizer.encode(prompt)
    full = pipe(prompt, **kw)["text"]
    shown = pipe.tokenizer.decode(ids)
    assert full.startswith(shown)
    return full[len(shown) :]


def test_the_model_uses_its_context(pipe):
    """The precondition of the equality tests: the same last token after different contexts
    leads to different greedy continuations."""
    a = expected(pipe, "中华人民共和国", top_k=1, max_new_tokens=8)
    b = expected(pipe, "国", top_k=1, max_new_tokens=8)
    ids = pipe.tokenizer.encode
    assert ids("中华人民共和国")[-1] == ids("国")[-1]
    assert a != b


def test_completion_shape_and_greedy_text(server, pipe):
    out = complete(server, prompt="北京", max_tokens=8, temperature=0)
    assert out["object"] == "text_completion" and out["model"] == MODEL_NAME
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["text"] == expected(pipe, "北京", top_k=1, max_new_tokens=8)
    # The generator's own greedy ids (cut before the end-of-document token): all 8 tokens
    # ("length"), or fewer when the model ended the document ("stop").
    from megagpt.inference.sampling import make_params

    ids = pipe.tokenizer.encode("北京")
    full = pipe.generator.generate([ids], make_params(top_k=1), max_new_tokens=8)[0][0]
    generated = len(full) - len(ids)
    assert choice["finish_reason"] == ("length" if generated == 8 else "stop")
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(ids)
    assert usage["completion_tokens"] == generated
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_sixteen_concurrent_clients_equal_one_at_a_time(server, pipe, monkeypatch):
    lengths = [4 + (i * 5) % 13 for i in range(len(PROMPTS))]  # rows leave at different steps
    engine = server.engine
    # The first prefill waits until all 16 requests are queued (at most 60 s): however late
    # the client threads get the CPU, the rows the scheduler fills and the steps it takes
    # are its own, not the arrival timing's.
    queued, everyone = [], threading.Event()
    submit, run = engine.submit, engine.executor.run

    def counted_submit(sequences):
        submit(sequences)
        queued.extend(sequences)
        if len(queued) >= len(PROMPTS):
            everyone.set()

    def held_run(op):
        if op[0] == "prefill":
            everyone.wait(60)
        return run(op)

    monkeypatch.setattr(engine, "submit", counted_submit)
    monkeypatch.setattr(engine.executor, "run", held_run)
    steps_before, engine.max_rows_seen = engine.steps, 0

    def one(i):
        return complete(server, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(len(PROMPTS))))
    assert everyone.is_set()
    # The server decoded 4 requests per step (its 4 rows), not one after another: one at a
    # time would take a step per token after the first (141 here, fewer only where a checked
    # guess was kept); four at a time about a quarter of that.
    assert engine.max_rows_seen == 4
    assert engine.steps - steps_before < (sum(lengths) - len(PROMPTS)) / 2, engine.steps
    for i, out in enumerate(results):
        want = expected(pipe, PROMPTS[i], top_k=1, max_new_tokens=lengths[i])
        assert out["choices"][0]["text"] == want, PROMPTS[i]


def test_seeded_sampling_does_not_depend_on_batch_companions(server, pipe):
    body = {"prompt": "春眠不觉晓", "max_tokens": 12, "top_p": 0.9, "seed": 11}
    alone = complete(server, **body)["choices"][0]["text"]
    with ThreadPoolExecutor(8) as pool:
        crowd = list(
            pool.map(lambda i: complete(server, **dict(body, seed=11 + (i > 0) * i)), range(8))
        )
    assert crowd[0]["choices"][0]["text"] == alone
    # The same rows as the pipeline's seeded sampling (same keys, same positions).
    assert alone == expected(pipe, "春眠不觉晓", top_p=0.9, seed=11, max_new_tokens=12)


def test_n_copies_with_seed(server, pipe):
    out = complete(server, prompt=["北京", "长江"], n=3, max_tokens=10, seed=5)
    choices = out["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    again = complete(server, prompt=["北京", "长江"], n=3, max_tokens=10, seed=5)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in choices]
    assert len({c["text"] for c in choices[:3]}) > 1, "copies must be sampled apart"
    # Copy c of prompt p is num_return_sequences' row c of the pipeline with the same seed.
    pipe_out = pipe(["北京", "长江"], top_p=1.0, seed=5, max_new_tokens=10, num_return_sequences=3)
    for p, prompt in enumerate(["北京", "长江"]):
        shown = pipe.tokenizer.decode(pipe.tokenizer.encode(prompt))
        for c in range(3):
            assert choices[p * 3 + c]["text"] == pipe_out[p][c]["text"][len(shown) :]


def test_stream_joins_to_the_plain_text(server):
    body = {"prompt": ["中华人民共和国", "山"], "max_tokens": 14, "n": 2, "seed": 3}
    plain = complete(server, **body)
    chunks = stream(server, **body, stream_options={"include_usage": True})
    texts = ["", "", "", ""]
    reasons = [None] * 4
    for c in chunks[:-1]:
        assert c["object"] == "text_completion"
        for choice in c["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                reasons[choice["index"]] = choice["finish_reason"]
    # Deltas only ever extend the text: a held-back partial character (test_text.py) shows up
    # once, complete, exactly as in the plain response.
    assert texts == [c["text"] for c in plain["choices"]]
    assert reasons == [c["finish_reason"] for c in plain["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_stop_strings_cut_the_text(server, pipe):
    full = complete(server, prompt="床前明月光，疑是地上霜。", max_tokens=24, temperature=0)[
        "choices"
    ][0]
    text = full["text"]
    assert len(text) >= 4, text
    stop = text[2:4]  # a two-character stop string from the middle of the text
    cut = text[: text.find(stop)]
    stopped = complete(
        server,
        prompt="床前明月光，疑是地上霜。",
        max_tokens=24,
        temperature=0,
        stop=[stop, "never-seen"],
    )
    out = stopped["choices"][0]
    assert out["text"] == cut and out["finish_reason"] == "stop"
    # completion_tokens counts the tokens decoded: up to the one after which the shown text
    # holds the stop string (greedy ids decoded after the prompt; a trailing U+FFFD is a
    # character still cut between tokens, not shown yet).
    from megagpt.inference.sampling import make_params

    tok = pipe.tokenizer
    ids = tok.encode("床前明月光，疑是地上霜。")
    gen = pipe.generator.generate([ids], make_params(top_k=1), max_new_tokens=24)[0][0][len(ids) :]
    n = len(tok.decode(ids))
    decoded = next(
        k for k in range(1, 25) if stop in tok.decode(ids + gen[:k])[n:].rstrip("\ufffd")
    )
    assert decoded < 24
    assert stopped["usage"]["completion_tokens"] == decoded
    chunks = stream(
        server, prompt="床前明月光，疑是地上霜。", max_tokens=24, temperature=0, stop=stop
    )
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == cut


def test_echo_penalty_token_prompts_and_empty_prompt(server, pipe):
    ids = pipe.tokenizer.encode("长江")
    plain = complete(server, prompt="长江", max_tokens=6, temperature=0)["choices"][0]["text"]
    echo = complete(server, prompt="长江", max_tokens=6, temperature=0, echo=True)
    assert echo["choices"][0]["text"] == pipe.tokenizer.decode(ids) + plain
    by_ids = complete(server, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids["choices"][0]["text"] == plain
    # The repetition penalty is the pipeline's (prompt and generated tokens penalised).
    out = complete(server, prompt="长江", max_tokens=12, temperature=0, repetition_penalty=1.5)
    assert out["choices"][0]["text"] == expected(
        pipe, "长江", top_k=1, max_new_tokens=12, repetition_penalty=1.5
    )
    assert out["choices"][0]["text"] != expected(pipe, "长江", top_k=1, max_new_tokens=12)
    # An empty prompt starts a new document, as pipe("") does.
    empty = complete(server, prompt="", max_tokens=5, temperature=0)["choices"][0]["text"]
    assert empty == pipe("", top_k=1, max_new_tokens=5)["text"]


def test_models_and_health(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert models["data"][0]["max_model_len"] == 64
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_generate_endpoint_is_the_pipelines_shape(server, pipe):
    r = httpx.post(
        f"{server.url}/generate",
        timeout=120,
        json={"text": "北京", "top_k": 1, "max_new_tokens": 6},
    )
    assert r.status_code == 200
    assert r.json() == pipe("北京", top_k=1, max_new_tokens=6)
    r = httpx.post(
        f"{server.url}/generate",
        timeout=120,
        json={"text": ["北京", "山"], "seed": 2, "max_length": 12},
    )
    assert r.json() == pipe(["北京", "山"], seed=2, max_length=12)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": "北京" * 80}, 400, "prompt"),
        ({"prompt": "北京", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "北京", "max_tokens": "8"}, 400, "max_tokens"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "北京", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "北京", "top_p": 1.5}, 400, "top_p"),
        ({"prompt": "北京", "top_k": 5, "top_p": 0.5}, 400, "top_k"),
        ({"prompt": "北京", "stop": [1]}, 400, "stop"),
        ({"prompt": "北京", "n": 0}, 400, "n"),
        ({"prompt": "北京", "stream": "yes"}, 400, "stream"),
        ({"prompt": [5000]}, 400, "prompt"),
        ({"prompt": "北京", "bogus": 1}, 400, "bogus"),
        ({"prompt": "北京", "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests_name_the_field_and_the_server_keeps_serving(server, body, status, param):
    good = {"prompt": "北京", "max_tokens": 3, "temperature": 0}
    before = complete(server, **good)
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL_NAME, **body} if "model" not in body else body,
        timeout=60,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert complete(server, **good)["choices"] == before["choices"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", 1),
        ("logprobs", 0),
        ("best_of", 2),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1.0),
        ("suffix", "。"),
        ("logit_bias", {"100": 5}),
    ],
)
def test_unsupported_openai_fields_are_refused_by_name(server, field, value):
    """OpenAI fields this server does not implement are a 400 that says so, never silently
    ignored (a client asking for logprobs or a penalty would otherwise get output that lacks
    what it asked for)."""
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": "北京", "max_tokens": 2, field: value},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field, error
    assert f"'{field}' is not supported by megagpt serve" in error["message"], error


def test_unsupported_openai_fields_at_their_off_values_are_accepted(server):
    """Clients send these fields by default at their "off" values: the answer is the same as
    without them."""
    body = {"prompt": "北京", "max_tokens": 4, "temperature": 0}
    off = {
        "logprobs": None,
        "best_of": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "suffix": None,
        "logit_bias": {},
    }
    plain = complete(server, **body)["choices"]
    assert complete(server, **body, **off)["choices"] == plain


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400])
@pytest.mark.parametrize(
    "route, field",
    [
        ("/v1/completions", "temperature"),
        ("/v1/completions", "top_p"),
        ("/v1/completions", "repetition_penalty"),
        ("/v1/completions", "presence_penalty"),
        ("/v1/completions", "frequency_penalty"),
        ("/generate", "temperature"),
        ("/generate", "top_p"),
        ("/generate", "repetition_penalty"),
    ],
)
def test_non_finite_numbers_are_a_400_naming_the_field(server, route, field, value):
    """Python's JSON reader takes NaN and Infinity (clients such as Python's own json send
    them); a NaN temperature or penalty used to decode 'max_tokens' tokens of empty text with
    HTTP 200, and an integer too large for a float was a 500. Sent as raw bytes: httpx's
    json= refuses to encode NaN."""
    prompt = '"prompt": "北京", "max_tokens": 4' if route != "/generate" else '"text": "北京"'
    top_k = ', "top_k": 1' if field == "temperature" else ""  # greedy: the value is unused
    for extra in ("", top_k):
        r = httpx.post(
            f"{server.url}{route}",
            content=f'{{{prompt}, "{field}": {value}{extra}}}'.encode(),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"], error
        assert "finite" in error["message"], error
    assert complete(server, prompt="北京", max_tokens=2, temperature=0)["choices"][0]["text"]


def test_malformed_json_and_unknown_route(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"{server.url}/generate", json={"txt": "北京"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "txt"
