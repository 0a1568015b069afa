"""Serving throughput: `megagpt serve` with continuous batching against one-at-a-time serving.

Two servers over the same model directory run side by side: ``--max-batch 16`` (continuous
batching) and ``--max-batch 1`` (each request decoded alone, in arrival order). For 1, 4 and 16
concurrent clients, each client sends its share of ``--requests`` greedy completions of
``--new-tokens`` tokens; the levels alternate between the two servers so both see the same
machine load. Reported: requests/s and generated tokens/s (wall clock, what a client sees) and
the server process's CPU seconds per 1000 tokens (user + system, from /proc: steadier than wall
time on a shared machine), with the batched/one-at-a-time ratio. Each level runs ``--repeats``
times per server, alternating which goes first; the best run is kept.

    python bench/serve.py --output BENCHMARKS-serve.md
    python bench/serve.py --model runs/x/model --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
BUNDLED = ROOT / "megagpt" / "assets" / "sample_corpus.jsonl"


def corpus() -> list[str]:
    wiki = SHARED / "corpus" / "wiki_cmrc2018.jsonl"
    path = wiki if wiki.is_file() else BUNDLED
    return [json.loads(x)["text"] for x in path.read_text("utf-8").splitlines() if x.strip()]


def random_model_dir(size: str, out: Path, docs: list[str]) -> str:
    """A model directory of a registered size (seeded random weights) with a tokenizer trained
    on ``docs``; built in a subprocess-free, single-process group."""
    import torch

    from megagpt import parallel
    from megagpt.checkpoint import model_dir
    from megagpt.config import ParallelConfig, from_name
    from megagpt.data import train_tokenizer
    from megagpt.model import GPTModel, initialize_weights, megatron_config

    cfg = from_name(size)
    tok = train_tokenizer(iter(docs[:300]), str(out / "tok"), vocab_size=cfg.vocab_size)
    cfg.vocab_size = tok.vocab_size
    cfg.dropout = cfg.attention_dropout = 0.0
    parallel.initialize(ParallelConfig(backend="gloo"), torch.device("cpu"))
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()))
    initialize_weights(model, cfg, 1234, 0, 1)
    directory = str(out / "model")
    model_dir.save_tensors(directory, model_dir.full_tensors(model, cfg))
    model_dir.write_config(directory, cfg)
    model_dir.copy_tokenizer(directory, str(out / "tok"))
    parallel.destroy()
    return directory


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `megagpt serve` subprocess."""

    def __init__(self, model: str, max_batch: int, threads: int, speculate: int | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megagpt.cli",
                "serve",
                "--model",
                model,
                "--port",
                str(self.port),
                "--max-batch",
                str(max_batch),
                "--device",
                "cpu",
                "--log-level",
                "warning",
                *([] if speculate is None else ["--speculate", str(speculate)]),
            ],
            env=env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server (max_batch {max_batch}) exited {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def speculation(self) -> dict:
        """The server's counts of checking steps, guesses fed and guesses kept."""
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json().get("speculation", {})

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def run_level(server: Server, prompts: list[str], clients: int, new_tokens: int) -> dict:
    """``len(prompts)`` greedy requests from ``clients`` concurrent clients."""
    import httpx

    def client(c: int) -> tuple[int, int]:
        done = tokens = 0
        with httpx.Client(timeout=600) as http:
            for prompt in prompts[c::clients]:
                r = http.post(
                    f"{server.url}/v1/completions",
                    json={"prompt": prompt, "max_tokens": new_tokens, "temperature": 0},
                )
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
                done += 1
        return done, tokens

    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    requests, tokens = sum(r[0] for r in results), sum(r[1] for r in results)
    return {
        "requests": requests,
        "tokens": tokens,
        "wall_s": wall,
        "req_s": requests / wall,
        "tok_s": tokens / wall,
        "cpu_per_ktok": 1000 * cpu / max(tokens, 1),
    }


def best(runs: list[dict]) -> dict:
    """The fastest repeat's wall figures and the lowest CPU cost (the least disturbed run)."""
    out = dict(max(runs, key=lambda r: r["req_s"]))
    out["cpu_per_ktok"] = min(r["cpu_per_ktok"] for r in runs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: a random --size model)")
    ap.add_argument("--size", default="gpt3-mini", help="registered size of the random model")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--new-tokens", type=int, default=32, help="max_tokens of each request")
    ap.add_argument("--prompt-chars", type=int, default=24, help="characters of each prompt")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels")
    ap.add_argument("--max-batch", type=int, default=16, help="rows of the batching server")
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs per level and server (best kept; the servers' order alternates)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument(
        "--speculate",
        type=int,
        help="both servers' --speculate (greedy guesses per step; default: the server's)",
    )
    ap.add_argument("--output", help="write a markdown report here")
    args = ap.parse_args()

    docs = corpus()
    tmp = tempfile.TemporaryDirectory()
    model = args.model or random_model_dir(args.size, Path(tmp.name), docs)
    prompts = [d[: args.prompt_chars] for d in docs[300 : 300 + args.requests]]
    levels = [int(x) for x in args.clients.split(",")]
    load_before = os.getloadavg()
    batched = Server(model, args.max_batch, args.threads, args.speculate)
    serial = Server(model, 1, args.threads, args.speculate)
    rows = []
    try:
        run_level(batched, prompts[:2], 1, 4)  # warm-up (first-call allocations)
        run_level(serial, prompts[:2], 1, 4)
        for clients in levels:
            runs: dict[str, list[dict]] = {"b": [], "s": []}
            for r in range(args.repeats):  # alternate which server goes first
                order = [("b", batched), ("s", serial)]
                for tag, server in order if r % 2 == 0 else order[::-1]:
                    runs[tag].append(run_level(server, prompts, clients, args.new_tokens))
            b, s = (best(runs[t]) for t in ("b", "s"))
            rows.append((clients, b, s))
            print(
                f"clients {clients:>2}: batched {b['req_s']:.2f} req/s {b['tok_s']:.1f} tok/s "
                f"| one-at-a-time {s['req_s']:.2f} req/s {s['tok_s']:.1f} tok/s | ratio "
                f"{b['tok_s'] / s['tok_s']:.2f}x wall, "
                f"{s['cpu_per_ktok'] / b['cpu_per_ktok']:.2f}x CPU/token",
                flush=True,
            )
        spec = {"batched": batched.speculation(), "one-at-a-time": serial.speculation()}
    finally:
        batched.close()
        serial.close()
    load_after = os.getloadavg()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        "# Serving benchmark (`megagpt serve`)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores, no GPU "
        f"({platform.python_version()}, torch {__import__('torch').__version__}); shared with "
        "other jobs",
        f"- command: `{command}`",
        f"- model: {args.model or args.size + ' (random weights)'}; {args.requests} greedy "
        f"requests per level, max_tokens {args.new_tokens}, prompts of {args.prompt_chars} "
        f"characters; servers with {args.threads} torch thread(s); best of {args.repeats} "
        "runs per level, the two servers' order alternating",
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.1f}' for x in load_before)}, "
        f"after: {'/'.join(f'{x:.1f}' for x in load_after)}",
        "- batched: `--max-batch "
        f"{args.max_batch}` (continuous batching); one-at-a-time: "
        "`--max-batch 1` (same server, one request decoded at a time)",
        "",
        "| clients | batched req/s | batched tok/s | one-at-a-time req/s | one-at-a-time tok/s "
        "| ratio (wall) | server CPU s / 1k tok (batched, one) | ratio (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients, b, s in rows:
        lines.append(
            f"| {clients} | {b['req_s']:.2f} | {b['tok_s']:.1f} | {s['req_s']:.2f} | "
            f"{s['tok_s']:.1f} | {b['tok_s'] / s['tok_s']:.2f}x | "
            f"{b['cpu_per_ktok']:.2f}, {s['cpu_per_ktok']:.2f} | "
            f"{s['cpu_per_ktok'] / b['cpu_per_ktok']:.2f}x |"
        )
    lines += [
        "",
        "Greedy speculation (n-gram guesses, `--speculate`; from each server's `/health`, all "
        "levels and the warm-up): "
        + "; ".join(
            f"{name}: {c.get('checks', 0):,} checking steps, {c.get('kept', 0):,} of "
            f"{c.get('guessed', 0):,} guesses kept"
            for name, c in spec.items()
        )
        + ".",
        "",
        "Reading: wall figures are what the clients saw (requests and generated tokens per "
        "second over the level); the CPU column is the server process's user + system time per "
        "1000 generated tokens, steadier than wall time on a loaded machine. With one client "
        "both servers run the same code (one active row), so their ratio there shows the "
        "noise of the machine, not a cost of batching; with 4 and 16 clients the batching "
        "server decodes up to that many requests per forward, the other one at a time.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        Path(args.output).write_text(report, encoding="utf-8")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
