"""`megagpt serve` under tensor parallelism (2 gloo processes, as torchrun starts them): rank 0
serves HTTP and schedules, rank 1 follows its steps; concurrent greedy requests give TP=1's
text, and stopping rank 0 (SIGTERM) stops both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.distributed.launcher import ROOT, free_port
from tests.unit.serving.conftest import context_model_dir

PROMPTS = [
    "中华人民共和国",
    "床前明月光，疑是地上霜。",
    "北京",
    "上海的天气",
    "春眠不觉晓",
    "人工智能",
    "白日依山尽",
    "长江",
]
# Alone on the server, a greedy row whose prompt repeats offers n-gram guesses from its first
# step, so the engine checks them whatever the model continues with; the concurrent requests
# above check guesses only when the arrival timing leaves rows whose guesses pay off together.
REPEATING = "床前明月光，床前明月光，床前明月光，床前"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return context_model_dir(tmp_path_factory)


def start_ranks(model_dir: str, world: int, port: int) -> list[subprocess.Popen]:
    master = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(master),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "megagpt.cli",
                    "serve",
                    "--model",
                    model_dir,
                    "--port",
                    str(port),
                    "--max-batch",
                    "4",
                    "--device",
                    "cpu",
                    "--log-level",
                    "warning",
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def wait_healthy(url: str, procs, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a rank exited {p.returncode}:\n{p.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not come up")


def one_at_a_time(model_dir: str, prompts: list[str], lengths: list[int]) -> list[str]:
    """TP=1 greedy continuations from the pipeline in this process."""
    from megagpt import pipeline
    from tests.distributed.local_group import _LocalGroup

    with _LocalGroup():
        pipe = pipeline("text-generation", model=model_dir, device="cpu")
        out = []
        for prompt, n in zip(prompts, lengths):
            shown = pipe.tokenizer.decode(pipe.tokenizer.encode(prompt))
            out.append(pipe(prompt, top_k=1, max_new_tokens=n)["text"][len(shown) :])
        return out


def test_tp2_server_equals_tp1_greedy_and_stops_cleanly(model_dir):
    lengths = [5 + (i * 7) % 11 for i in range(len(PROMPTS))]
    want = one_at_a_time(model_dir, [*PROMPTS, REPEATING], [*lengths, 12])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = start_ranks(model_dir, 2, port)
    try:
        wait_healthy(url, procs)

        def ask(i):
            prompt, n = (PROMPTS[i], lengths[i]) if i < len(PROMPTS) else (REPEATING, 12)
            r = httpx.post(
                f"{url}/v1/completions",
                timeout=120,
                json={"prompt": prompt, "max_tokens": n, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(ask, range(len(PROMPTS))))
        assert got == want[: len(PROMPTS)]
        # A lone greedy row checks n-gram guesses: the follower runs the same checking passes.
        before = httpx.get(f"{url}/health").json()["speculation"]["checks"]
        assert ask(len(PROMPTS)) == want[-1]
        assert httpx.get(f"{url}/health").json()["speculation"]["checks"] > before
        bad = httpx.post(f"{url}/v1/completions", json={"prompt": "北京", "n": "2"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
        assert ask(2) == want[2]  # still serving, the follower still in step
    finally:
        procs[0].send_signal(signal.SIGTERM)  # what torchrun and schedulers send
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append("timeout")
    logs = [p.stdout.read() for p in procs]
    assert codes == [0, 0], logs
