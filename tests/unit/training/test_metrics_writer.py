"""metrics.jsonl is strict JSON and, after a resume, holds each step once."""

from __future__ import annotations

import json

from megagpt.training.metrics import MetricsWriter


def _writer(tmp_path):
    return MetricsWriter(
        str(tmp_path), enabled=True, wandb_mode="disabled", project="p", run_name="r", config={}
    )


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-JSON literal {name}")

    return json.loads(line, parse_constant=refuse)


def test_nonfinite_values_are_written_as_null_with_a_flag(tmp_path):
    w = _writer(tmp_path)
    w.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    w.log({"step": 2, "loss": 2.5, "grad_norm": -float("inf"), "lr": 1e-3})
    w.close()
    one, two = [_strict(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert one == {
        "step": 1,
        "loss": None,
        "loss_nonfinite": True,
        "grad_norm": None,
        "grad_norm_nonfinite": True,
        "lr": 1e-3,
    }
    assert two == {
        "step": 2,
        "loss": 2.5,
        "grad_norm": None,
        "grad_norm_nonfinite": True,
        "lr": 1e-3,
    }


def test_truncate_after_keeps_steps_up_to_the_resumed_one(tmp_path):
    """Records after the checkpoint's step go (the resume logs them again), the evaluation at
    that step stays, and a line half-written by a kill is dropped."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)]
    lines.insert(3, json.dumps({"step": 3, "valid_loss": 2.0}))
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')
    w = _writer(tmp_path)
    w.truncate_after(3)
    w.log({"step": 4, "loss": 0.5})
    w.close()
    records = [_strict(x) for x in path.read_text().splitlines()]
    assert [(r["step"], "valid_loss" in r) for r in records] == [
        (1, False),
        (2, False),
        (3, False),
        (3, True),
        (4, False),
    ]
    assert records[-1]["loss"] == 0.5


def test_disabled_writer_touches_nothing(tmp_path):
    w = MetricsWriter(
        str(tmp_path), enabled=False, wandb_mode="disabled", project="p", run_name="r", config={}
    )
    w.truncate_after(0)
    w.log({"step": 1, "loss": float("nan")})
    assert not (tmp_path / "metrics.jsonl").exists()
