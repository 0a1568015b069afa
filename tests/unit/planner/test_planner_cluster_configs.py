"""Every layout in configs/cluster: valid for its cluster, fits by the planner, and keeps its
pretraining recipe's hyperparameters and global batch in tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from megagpt.config import get_size, load_config, validate
from megagpt.config.loader import load_yaml
from megagpt.planner.hardware import ClusterShape, gpu_type
from megagpt.planner.memory import Layout
from megagpt.planner.search import evaluate
from megagpt.planner.write import parse_plan_header

ROOT = Path(__file__).resolve().parents[3]
CLUSTER = sorted((ROOT / "configs" / "cluster").glob("*.yaml"))
LAYOUT_KEYS = set(Layout(1, 1, 1, 1).overrides())


def test_every_required_size_has_a_layout():
    sizes = {parse_plan_header(p)["model"] for p in CLUSTER}
    assert {"gpt3-1.3b", "gpt3-2.7b", "gpt3-13b", "gpt3-30b", "gpt3-175b"} <= sizes
    assert any(
        parse_plan_header(p)["model"] == "gpt3-175b"
        and int(parse_plan_header(p)["nodes"]) * int(parse_plan_header(p)["gpus_per_node"]) == 1024
        for p in CLUSTER
    )


@pytest.mark.parametrize("path", CLUSTER, ids=[p.stem for p in CLUSTER])
def test_cluster_layout_passes_the_planner(path):
    head = parse_plan_header(path)
    shape = ClusterShape(int(head["nodes"]), int(head["gpus_per_node"]), gpu_type(head["gpu"]))
    cfg = load_config(path)
    assert cfg.model.name == head["model"]
    validate(cfg, shape.world, cuda=True, need_data=False)
    plan = evaluate(cfg, Layout.from_config(cfg, shape.world), shape)
    assert plan.fits, plan.problems
    # Same global batch in tokens as the size's table row (the seed recipe).
    size = get_size(head["model"])
    assert (
        cfg.train.global_batch_size * cfg.model.seq_length
        == size.global_batch_sequences * size.seq_length
    )
    # Hyperparameters: exactly the recipe's keys, only layout keys differ or are added.
    recipe = {k: v for k, v, _ in load_yaml(ROOT / head["recipe"])}
    mine = {k: v for k, v, _ in load_yaml(path)}
    for key, value in recipe.items():
        if key not in LAYOUT_KEYS:
            assert mine.get(key) == value, key
    assert set(mine) - set(recipe) <= LAYOUT_KEYS
    # ... and a matching sbatch wrapper that launches this file on the same shape.
    sbatch = (ROOT / "launch" / "slurm" / "sizes" / f"{path.stem}.sbatch").read_text()
    assert f"#SBATCH --nodes={shape.nodes}" in sbatch
    assert f"#SBATCH --gpus-per-node={shape.gpus_per_node}" in sbatch
    assert f"configs/cluster/{path.name}" in sbatch
