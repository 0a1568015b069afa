"""``megagpt plot``: training curves of one or more run directories, from their metrics.jsonl.

One PNG, two columns (x = optimizer steps, x = tokens trained), five rows: loss (train solid,
validation dashed with markers), learning rate, gradient norm, tokens/s, MFU. Several runs are
overlaid, one colour per run, the legend naming each run (``run.name`` from its config.yaml,
else the directory's name).

Tokens = ``consumed_samples x model.seq_length`` (both from the run directory). Validation
records carry no ``consumed_samples``: their token position is interpolated from the training
records around them (exact at log steps, where evaluation usually falls).

Robust to what real runs leave behind: a resumed run repeats steps (the last record of a step
wins, as ``MetricsWriter.truncate_after`` would have kept it), a killed run leaves a half-written
last line (skipped), values may be null or non-finite (NaN loss, ``mfu`` null on CPU: drawn as a
gap; a metric with no value at all gets an empty panel saying so).

matplotlib is an optional dependency (``pip install -e ".[plot]"``); it runs on the Agg backend,
so no display is needed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megagpt.errors import MegagptError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = "metrics.jsonl"

# (record key, panel title, y scale, value transform) for each row of the figure.
PANELS = (
    ("loss", "loss", "linear", None),
    ("lr", "learning rate", "linear", None),
    ("grad_norm", "gradient norm", "log", None),
    ("tokens_per_s", "tokens/s", "linear", None),
    ("mfu", "MFU (%)", "linear", 100.0),
)
VALID_KEY = "valid_loss"
NO_DATA = {
    "mfu": "\n(MFU is null on CPU, and on a GPU of unknown peak\nunless logging.peak_tflops is set)"
}


class PlotError(MegagptError):
    """A run directory that cannot be plotted (no metrics.jsonl, no records); names the file."""


@dataclass
class RunMetrics:
    """The curves of one run: per record key, ``{step: value}`` (last record per step wins;
    a null or non-finite value is NaN), plus how to turn steps into tokens."""

    name: str
    path: str
    series: dict[str, dict[int, float]] = field(default_factory=dict)
    consumed: dict[int, float] = field(default_factory=dict)  # step -> consumed_samples
    seq_length: int | None = None
    bad_lines: int = 0
    first_bad_line: int | None = None  # 1-based line number in metrics.jsonl

    def points(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key``, sorted by step."""
        s = self.series.get(key, {})
        steps = sorted(s)
        return steps, [s[k] for k in steps]

    def tokens(self, steps: list[int]) -> list[float]:
        """Tokens trained at each of ``steps``; NaN where unknown (no seq_length)."""
        if self.seq_length is None or not self.consumed:
            return [math.nan] * len(steps)
        known = dict(self.consumed)
        known.setdefault(0, 0.0)
        xs = sorted(known)
        out = []
        for step in steps:
            out.append(_interp(step, xs, [known[x] for x in xs]) * self.seq_length)
        return out


def _interp(x: float, xs: list[int], ys: list[float]) -> float:
    """Piecewise-linear ``ys(x)``, extended linearly past the last known point (a validation
    record after the last log line of a run still gets a token position)."""
    if len(xs) == 1:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]  # not reached


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _run_config(run_dir: Path) -> dict:
    """The run's resolved config.yaml as a dict ({} when absent or unreadable: the plot then
    has no token axis for this run, which is not worth refusing the plot for)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def read_run(run_dir: str) -> RunMetrics:
    """Read ``run_dir/metrics.jsonl`` (and config.yaml for the name and sequence length).

    Raises:
        PlotError: the directory or its metrics.jsonl is missing, or it holds no record.
    """
    root = Path(run_dir)
    path = root / METRICS
    if not root.is_dir():
        raise PlotError(f"{root}: no such run directory")
    if not path.is_file():
        raise PlotError(
            f"{path}: no such file; is {root} a megagpt run directory (training "
            "writes metrics.jsonl there at its first log step)?"
        )
    cfg = _run_config(root)
    name = (cfg.get("run") or {}).get("name") or root.resolve().name
    seq = (cfg.get("model") or {}).get("seq_length")
    run = RunMetrics(
        name=str(name),
        path=str(root),
        seq_length=int(seq) if isinstance(seq, int) and seq > 0 else None,
    )
    records = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # also takes the NaN/Infinity of older writers
            except ValueError:  # a line half-written when the process was killed
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                run.bad_lines += 1
                if run.first_bad_line is None:
                    run.first_bad_line = lineno
                continue
            records += 1
            step = record["step"]
            for key, value in record.items():
                if key == "step" or key.endswith("_nonfinite"):
                    continue
                if key == "consumed_samples":
                    v = _number(value)
                    if not math.isnan(v):
                        run.consumed[step] = v
                    continue
                # Last record of a step wins: a resume re-runs the steps after its checkpoint.
                run.series.setdefault(key, {})[step] = _number(value)
    if records == 0:
        raise PlotError(
            f"{path}: no metrics records"
            + (
                f": {run.bad_lines} unreadable line(s), the first at {path}:{run.first_bad_line}"
                if run.bad_lines
                else "; the run has not reached its first log step"
            )
        )
    return run


def _names(runs: list[RunMetrics]) -> list[str]:
    """Legend labels: the run names, made unique with the path where two runs share one."""
    names = [r.name for r in runs]
    return [f"{r.name} ({r.path})" if names.count(r.name) > 1 else r.name for r in runs]


def plot_runs(run_dirs: list[str], out: str | None = None) -> Figure:
    """Draw the curves of ``run_dirs`` into one figure; save it as PNG to ``out`` if given.

    Returns:
        The matplotlib Figure: ``len(PANELS)`` rows x 2 columns of axes (steps, tokens).

    Raises:
        PlotError: a run directory has no readable metrics.jsonl (see ``read_run``), or
            matplotlib is not installed.
    """
    if not run_dirs:
        raise PlotError("no run directory given")
    return draw_runs([read_run(d) for d in run_dirs], out)


def draw_runs(runs: list[RunMetrics], out: str | None = None) -> Figure:
    """``plot_runs`` of runs already read with ``read_run``."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            'matplotlib is not installed: pip install -e ".[plot]" (or pip install matplotlib)'
        ) from None
    matplotlib.use("Agg", force=True)  # files only, never a display
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig = Figure(figsize=(13, 3.0 * len(PANELS)), layout="constrained")
    axes = fig.subplots(len(PANELS), 2, squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = _names(runs)
    for row, (key, title, scale, factor) in enumerate(PANELS):
        for col in range(2):
            ax = axes[row][col]
            drawn = has_values = False
            for i, run in enumerate(runs):
                colour = colours[i % len(colours)]
                keys = [(key, "-", None, labels[i])]
                if key == "loss":
                    keys.append((VALID_KEY, "--", "o", f"{labels[i]} (valid)"))
                for k, style, marker, label in keys:
                    steps, values = run.points(k)
                    if factor is not None:
                        values = [v * factor for v in values]
                    if not steps or all(math.isnan(v) for v in values):
                        continue
                    has_values = True
                    x = steps if col == 0 else run.tokens(steps)
                    if col == 1 and all(math.isnan(v) for v in x):
                        continue
                    ax.plot(
                        x, values, style, marker=marker, markersize=3, color=colour, label=label
                    )
                    drawn = True
            ax.set_title(f"{title} vs {'step' if col == 0 else 'tokens'}", fontsize=10)
            ax.set_xlabel("step" if col == 0 else "tokens")
            ax.grid(True, alpha=0.3)
            if not drawn:
                why = (
                    "no tokens axis:\nno model.seq_length in the runs' config.yaml"
                    if has_values
                    else "no data" + NO_DATA.get(key, "")
                )
                ax.text(
                    0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="grey"
                )
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            if col == 0:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                ax.xaxis.set_major_formatter(EngFormatter())
            if scale == "log" and _spans_decades(ax):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.suptitle(", ".join(labels))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, format="png")
    return fig


def _spans_decades(ax) -> bool:
    """Whether a log axis helps: all values positive and spanning more than a factor of 20."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if not math.isnan(y)]
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 20


def default_output(run_dirs: list[str]) -> str:
    """``RUN_DIR/metrics.png`` for one run; ``metrics.png`` here for several."""
    return os.path.join(run_dirs[0], "metrics.png") if len(run_dirs) == 1 else "metrics.png"


def check_output(out: str) -> None:
    """PlotError naming ``--out`` when the PNG could not be written there (a directory, a name
    that is not .png, a folder that cannot be made); checked before anything is drawn."""
    path = Path(out)
    if path.is_dir():
        raise PlotError(
            f"--out {out}: is a directory; give a file name, e.g. {path / 'metrics.png'}"
        )
    if path.suffix.lower() != ".png":
        raise PlotError(f"--out {out}: the plot is a PNG; give a file name ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlotError(f"--out {out}: cannot create {path.parent} ({e.strerror})") from None


def run(args) -> int:
    """The ``megagpt plot`` subcommand."""
    out = args.out or default_output(args.run_dirs)
    runs = [read_run(d) for d in args.run_dirs]  # first: the default --out is in a run dir
    check_output(out)
    for r in runs:
        if r.bad_lines:
            # Skipped, not fatal: a killed run leaves a half-written last line, and a resumed
            # one appends after it. Said once per file, so a corrupt file is not silent.
            print(
                f"megagpt plot: warning: {Path(r.path) / METRICS}:{r.first_bad_line}: not a "
                f"metrics record; skipped {r.bad_lines} such line(s)",
                file=sys.stderr,
            )
    try:
        draw_runs(runs, out)
    except OSError as e:
        raise PlotError(f"--out {out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {out}")
    return 0
