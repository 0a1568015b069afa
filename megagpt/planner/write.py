"""Write a plan as a config + sbatch pair.

The config is the pretraining recipe's own keys (hyperparameters untouched) with the layout's
keys set, under a header recording the cluster shape and the planner's prediction; a machine-
readable ``# megagpt-plan:`` line lets tests re-check every committed layout. The sbatch file
carries the Slurm topology and hands over to ``launch/slurm/train.sbatch``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from megagpt.config.loader import load_yaml
from megagpt.planner.hardware import GIB, ClusterShape
from megagpt.planner.memory import Layout

ROOT = Path(__file__).resolve().parents[2]
PLAN_TAG = "# megagpt-plan:"


def plan_name(model: str, shape: ClusterShape) -> str:
    """File stem of a plan, e.g. gpt3-175b_128x8-h100-80gb."""
    return f"{model}_{shape.nodes}x{shape.gpus_per_node}-{shape.gpu.name}"


def parse_plan_header(path: str | Path) -> dict[str, str]:
    """The ``# megagpt-plan: key=value ...`` line of a written config, as a dict."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith(PLAN_TAG):
            return dict(kv.split("=", 1) for kv in line[len(PLAN_TAG) :].split())
    raise ValueError(f"{path}: no '{PLAN_TAG}' line (not written by `megagpt plan --write`)")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def config_text(recipe: str, model: str, layout: Layout, shape: ClusterShape, summary: str) -> str:
    """The YAML of a cluster config: ``recipe``'s keys with the layout keys set."""
    sections: dict[str, dict] = {}
    for dotted, value, _ in load_yaml(recipe):
        sec, _, key = dotted.partition(".")
        sections.setdefault(sec, {})[key] = value
    for dotted, value in layout.overrides().items():
        sec, _, key = dotted.partition(".")
        sections.setdefault(sec, {})[key] = value
    order = ["model", "parallel", "optim", "train", "checkpoint", "data", "logging", "run"]
    ordered = {s: sections[s] for s in order if s in sections}
    ordered.update({s: v for s, v in sections.items() if s not in ordered})
    header = [
        f"# {model} on {shape.describe()}.",
        (
            f"# Layout chosen by `megagpt plan --model {model} --nodes {shape.nodes} "
            f"--gpus-per-node {shape.gpus_per_node} --gpu {shape.gpu.name}`;"
        ),
        f"# hyperparameters are those of {_rel(Path(recipe))} (same global batch in tokens).",
        f"# Planner: {summary}",
        (
            f"# Launch: sbatch --nodes={shape.nodes} --gpus-per-node={shape.gpus_per_node} "
            f"launch/slurm/train.sbatch THIS_FILE [KEY=VALUE ...]"
        ),
        (
            f"{PLAN_TAG} model={model} nodes={shape.nodes} gpus_per_node={shape.gpus_per_node} "
            f"gpu={shape.gpu.name} recipe={_rel(Path(recipe))}"
        ),
    ]
    body = []
    for sec, keys in ordered.items():
        body.append(f"{sec}:")
        for key, value in keys.items():
            # One key per line, lists in flow style, as the hand-written recipes are.
            text = yaml.safe_dump(value, default_flow_style=True, width=1000, allow_unicode=True)
            body.append(f"  {key}: {text.split(chr(10) + '...')[0].strip()}")
    return "\n".join(header + body) + "\n"


def sbatch_text(config_path: Path, model: str, shape: ClusterShape, signal_s: int) -> str:
    """A wrapper job script: the Slurm topology of ``shape``, then train.sbatch."""
    cfg = _rel(config_path)
    cfg_arg = f'"$ROOT/{cfg}"' if not cfg.startswith("/") else f'"{cfg}"'
    return f"""#!/bin/bash
# {model} on {shape.describe()}.
# Written by `megagpt plan --write`; submit from the repository root:
#   sbatch --time=HH:MM:SS {{this file}} [KEY=VALUE ...]     (e.g. data.paths=[/data/prefix])
#SBATCH --job-name={model}
#SBATCH --nodes={shape.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={shape.gpus_per_node}
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@{signal_s}
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
ROOT=${{MEGAGPT_ROOT:-${{SLURM_SUBMIT_DIR:-$PWD}}}}
if [ ! -f "$ROOT/launch/slurm/train.sbatch" ]; then
  echo "{model}: error: $ROOT/launch/slurm/train.sbatch not found:" \\
       "submit from the megagpt repository root, or set MEGAGPT_ROOT" >&2
  exit 2
fi
exec bash "$ROOT/launch/slurm/train.sbatch" {cfg_arg} "$@"
"""


def signal_lead(params_per_gpu: int, precision_bytes: int) -> int:
    """Seconds before the time limit to ask for a checkpoint: room for one step and a save of
    every GPU's weights + optimizer state (~16 B/parameter) at a conservative 0.5 GB/s per GPU
    to shared storage, at least 300 s."""
    save_s = params_per_gpu * (precision_bytes + 12) / 0.5e9
    return int(max(300, 120 + 2 * save_s))


def write_pair(
    recipe: str,
    model: str,
    layout: Layout,
    shape: ClusterShape,
    summary: str,
    config_dir: str,
    sbatch_dir: str | None,
    params_per_gpu: int,
    precision_bytes: int,
) -> tuple[Path, Path]:
    """Write ``<config_dir>/<name>.yaml`` and ``<sbatch_dir>/<name>.sbatch``; returns both."""
    name = plan_name(model, shape)
    cdir = Path(config_dir)
    sdir = Path(sbatch_dir) if sbatch_dir else cdir
    cdir.mkdir(parents=True, exist_ok=True)
    sdir.mkdir(parents=True, exist_ok=True)
    cpath, spath = cdir / f"{name}.yaml", sdir / f"{name}.sbatch"
    cpath.write_text(config_text(recipe, model, layout, shape, summary), encoding="utf-8")
    spath.write_text(
        sbatch_text(cpath, model, shape, signal_lead(params_per_gpu, precision_bytes)),
        encoding="utf-8",
    )
    spath.chmod(0o755)
    return cpath, spath


def gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"
