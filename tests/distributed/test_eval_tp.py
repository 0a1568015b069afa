"""`megagpt eval` under torchrun-style launches: tensor parallel (TP=2) and data parallel
(--tp 1 on 2 ranks) give the numbers of one process, and one rank writes."""

from __future__ import annotations

import json

import pytest

from tests.distributed.launcher import run_distributed

pytest.importorskip("lm_eval")

TASK = "megagpt_zh_mc"
TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "人工智能正在改变世界。",
    "长江是中国最长的河流，全长约六千三百公里。",
    "春眠不觉晓，处处闻啼鸟。",
]


def eval_cli(model: str, data: str, out: str, tp: int | None, tasks: bool = True) -> dict:
    """Worker: ``megagpt eval`` with perplexity (and the bundled task); which ranks wrote."""
    import os

    from megagpt import parallel
    from megagpt.cli import main

    mine = f"{out}.rank{os.environ['RANK']}"
    argv = [
        "eval",
        "--model",
        model,
        "--data",
        data,
        "--window",
        "16",
        "--stride",
        "8",
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "--output",
        mine,
    ]
    if tasks:
        argv += ["--tasks", TASK, "--limit", "8", "--log-samples"]
    code = main(argv + (["--tp", str(tp)] if tp else []))
    parallel.destroy()
    return {"code": code, "wrote": os.path.exists(mine)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.unit.evaluation.conftest import build_bert_model_dir

    root = tmp_path_factory.mktemp("eval_tp")
    model = build_bert_model_dir(root)  # building needs no process group
    data = root / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS * 2),
        encoding="utf-8",
    )
    return {"model": model, "data": str(data), "root": root}


def _run(assets, world: int, tp: int | None, name: str, tasks: bool = True) -> dict:
    out = str(assets["root"] / name)
    res = run_distributed(
        "tests.distributed.test_eval_tp:eval_cli",
        world,
        model=assets["model"],
        data=assets["data"],
        out=out,
        tp=tp,
        tasks=tasks,
    )
    assert [r["code"] for r in res] == [0] * world
    assert [r["wrote"] for r in res] == [True] + [False] * (world - 1)  # global rank 0 only
    return json.loads(open(f"{out}.rank0", encoding="utf-8").read())


def _lls(result: dict) -> list[list[float]]:
    samples = sorted(result["tasks"]["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_tensor_and_data_parallel_equal_one_process(assets):
    one = _run(assets, 1, None, "tp1")
    tp2 = _run(assets, 2, None, "tp2")  # --tp defaults to the world size
    # The documents are shared over two replicas (lm-eval tasks run whole on every replica).
    dp2 = _run(assets, 2, 1, "dp2", tasks=False)
    assert tp2["perplexity"]["tensor_parallel"] == 2 and dp2["perplexity"]["data_parallel"] == 2
    for other in (tp2, dp2):
        a, b = one["perplexity"], other["perplexity"]
        assert (a["tokens"], a["characters"], a["documents"]) == (
            b["tokens"],
            b["characters"],
            b["documents"],
        )
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-5)
    for x, y in zip(_lls(one), _lls(tp2), strict=True):
        assert y == pytest.approx(x, abs=1e-4)
    assert tp2["metrics"] == pytest.approx(one["metrics"])
