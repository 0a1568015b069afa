"""`megagpt plot`: curves of several run directories from their metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from megagpt.cli import main  # noqa: E402
from megagpt.training.plots import PANELS, PlotError, plot_runs, read_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _line(record: dict) -> str:
    return json.dumps(record) + "\n"  # NaN stays a literal, as older writers left it


def make_run(root, name, *, steps=20, seq=64, gb=4, resume_at=None, mfu=True, extra=""):
    """A run dir as the trainer leaves it: config.yaml + metrics.jsonl (train records every
    step, validation every 5); ``resume_at`` repeats the steps after it with other values."""
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(
        f"model:\n  seq_length: {seq}\nrun:\n  name: ''\n", encoding="utf-8"
    )
    lines = []

    def train(step, bump=0.0):
        return {
            "step": step,
            "loss": 8.0 / step + bump,
            "lr": 1e-3 * min(1, step / 5),
            "grad_norm": 2.0 / step,
            "consumed_samples": step * gb,
            "tokens_per_s": 1000.0 + step,
            "mfu": 0.3 if mfu else None,
        }

    for step in range(1, steps + 1):
        lines.append(_line(train(step)))
        if step % 5 == 0:
            lines.append(_line({"step": step, "valid_loss": 8.5 / step, "valid_ppl": 1.0}))
    if resume_at is not None:
        for step in range(resume_at + 1, steps + 1):
            lines.append(_line(train(step, bump=100.0)))
    (d / "metrics.jsonl").write_text("".join(lines) + extra, encoding="utf-8")
    return d


def test_plot_two_runs_png_and_axes(tmp_path):
    a = make_run(tmp_path, "run-a")
    b = make_run(tmp_path, "run-b", steps=12, seq=128, mfu=False)  # mfu null: CPU run
    out = tmp_path / "plots" / "both.png"
    fig = plot_runs([str(a), str(b)], str(out))
    assert out.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(out) as im:
        im.verify()
        assert im.size[0] > 500 and im.size[1] > 500
    axes = fig.get_axes()
    assert len(axes) == 2 * len(PANELS)
    loss_steps, loss_tokens = axes[0], axes[1]
    labels = [line.get_label() for line in loss_steps.get_lines()]
    assert labels == ["run-a", "run-a (valid)", "run-b", "run-b (valid)"]
    assert [t.get_text() for t in loss_steps.get_legend().get_texts()] == labels
    # x against tokens = consumed_samples * seq_length, per run's own seq_length.
    xa = loss_tokens.get_lines()[0].get_xdata()
    xb = loss_tokens.get_lines()[2].get_xdata()
    assert xa[-1] == 20 * 4 * 64 and xb[-1] == 12 * 4 * 128
    valid_x = loss_tokens.get_lines()[1].get_xdata()  # validation records: no consumed_samples
    assert list(valid_x) == [s * 4 * 64 for s in (5, 10, 15, 20)]
    # MFU in percent; run-b has none, so only run-a is drawn.
    mfu_ax = axes[2 * [p[0] for p in PANELS].index("mfu")]
    assert [line.get_label() for line in mfu_ax.get_lines()] == ["run-a"]
    assert mfu_ax.get_lines()[0].get_ydata()[0] == pytest.approx(30.0)
    # Every panel draws its own metric: the y-values of each line (both columns) are the
    # values make_run wrote, per run, in step order.
    runs = {"run-a": range(1, 21), "run-b": range(1, 13)}
    want = {
        "loss": lambda s: 8.0 / s,
        "lr": lambda s: 1e-3 * min(1, s / 5),
        "grad_norm": lambda s: 2.0 / s,
        "tokens_per_s": lambda s: 1000.0 + s,
        "mfu": lambda s: 30.0,
    }
    for row, (key, *_) in enumerate(PANELS):
        for col in range(2):
            lines = {line.get_label(): line for line in axes[2 * row + col].get_lines()}
            expected = {name: [want[key](s) for s in steps] for name, steps in runs.items()}
            if key == "loss":
                for name, steps in runs.items():
                    expected[f"{name} (valid)"] = [8.5 / s for s in steps if s % 5 == 0]
            if key == "mfu":
                del expected["run-b"]  # mfu null: not drawn (checked above)
            assert sorted(lines) == sorted(expected), (key, col)
            for label, ys in expected.items():
                got = list(lines[label].get_ydata())
                assert got == pytest.approx(ys, rel=1e-12), (key, col, label)
                if col == 0:  # x = the steps the values belong to
                    steps = list(runs[label.split(" ")[0]])
                    if label.endswith("(valid)"):
                        steps = [s for s in steps if s % 5 == 0]
                    assert list(lines[label].get_xdata()) == steps, (key, label)


def test_resume_repeats_keep_last_record_and_nan_is_a_gap(tmp_path):
    d = make_run(
        tmp_path,
        "r",
        steps=10,
        resume_at=6,
        extra=_line({"step": 11, "loss": math.nan, "lr": None}) + '{"step": 12, "lo',
    )
    run = read_run(str(d))
    steps, loss = run.points("loss")
    assert steps == list(range(1, 12))  # one point per step, half-written last line skipped
    assert loss[6] == pytest.approx(8.0 / 7 + 100.0)  # the record after the resume wins
    assert loss[5] == pytest.approx(8.0 / 6)  # steps up to the checkpoint are untouched
    assert math.isnan(loss[-1]) and math.isnan(run.points("lr")[1][-1])
    assert run.bad_lines == 1
    fig = plot_runs([str(d)])
    assert len(fig.get_axes()) == 2 * len(PANELS)


def test_missing_or_empty_metrics_names_the_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PlotError, match=r"empty/metrics\.jsonl: no such file"):
        plot_runs([str(empty)])
    (empty / "metrics.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(PlotError, match=r"empty/metrics\.jsonl: no metrics records"):
        read_run(str(empty))
    code = main(["plot", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "nope: no such run directory" in err and "Traceback" not in err


def test_cli_writes_default_png_in_the_run_dir(tmp_path, capsys):
    d = make_run(tmp_path, "solo", steps=6)
    assert main(["plot", str(d)]) == 0
    assert (d / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    out = tmp_path / "x.png"
    assert main(["plot", str(d), str(make_run(tmp_path, "two", steps=3)), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and f"wrote {out}" in capsys.readouterr().out


def test_tensorboard_sink_writes_event_files(tmp_path):
    """logging.tensorboard=true: MetricsWriter also writes TensorBoard scalars (run_dir/
    tensorboard), read back here with TensorBoard's own reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megagpt.config import load_config
    from megagpt.training.metrics import MetricsWriter

    recipe = Path(__file__).resolve().parents[3] / "configs" / "pretrain" / "tiny.yaml"
    cfg = load_config(str(recipe), ["logging.tensorboard=true"])
    assert cfg.logging.tensorboard is True
    w = MetricsWriter(
        str(tmp_path),
        enabled=True,
        wandb_mode="disabled",
        project="p",
        run_name="r",
        config={},
        tensorboard=cfg.logging.tensorboard,
    )
    w.log({"step": 1, "loss": 2.5, "lr": 1e-3, "mfu": None})
    w.log({"step": 2, "loss": 2.0, "lr": 2e-3, "mfu": None})
    w.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "mfu" not in acc.Tags()["scalars"]  # null is not a value
    loss = acc.Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 2.0)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in lines] == [1, 2]


def test_tensorboard_off_by_default(tmp_path):
    from megagpt.training.metrics import MetricsWriter

    w = MetricsWriter(
        str(tmp_path), enabled=True, wandb_mode="disabled", project="p", run_name="r", config={}
    )
    w.log({"step": 1, "loss": 2.5})
    w.close()
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_resume_hides_the_re_run_steps(tmp_path):
    """A resume from the checkpoint of step 2 re-runs steps 3-4: TensorBoard shows each step
    once, with the value of the resumed run (as metrics.jsonl keeps it)."""
    pytest.importorskip("tensorboard")
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megagpt.training.metrics import MetricsWriter

    def writer():
        return MetricsWriter(
            str(tmp_path),
            enabled=True,
            wandb_mode="disabled",
            project="p",
            run_name="r",
            config={},
            tensorboard=True,
        )

    w = writer()
    for step in range(1, 5):
        w.log({"step": step, "loss": float(step)})
    w.close()
    time.sleep(1.1)  # event files are named by the second: the resumed run gets its own
    w = writer()
    w.truncate_after(2)
    w.log({"step": 3, "loss": 30.0})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_corrupt_line_is_named_by_file_and_line(tmp_path, capsys):
    d = make_run(tmp_path, "r", steps=3)
    path = d / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    corrupt_at = 2  # a line in the middle, not a half-written tail
    lines.insert(corrupt_at - 1, "this is not json\n")
    path.write_text("".join(lines), encoding="utf-8")
    assert main(["plot", str(d)]) == 0  # the readable records are still plotted
    err = capsys.readouterr().err
    assert f"{path}:{corrupt_at}: not a metrics record; skipped 1 such line(s)" in err
    path.write_text('{"step": "one"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(PlotError, match=r"2 unreadable line\(s\), the first at .*metrics\.jsonl:1"):
        read_run(str(d))


@pytest.mark.parametrize(
    "out, needle",
    [
        ("{run}", "is a directory; give a file name"),
        ("{tmp}/curves.jpg", "the plot is a PNG"),
        ("{tmp}/a-file/x.png", "cannot create"),
    ],
)
def test_a_bad_out_names_the_flag_and_writes_nothing(tmp_path, capsys, out, needle):
    d = make_run(tmp_path, "r", steps=3)
    (tmp_path / "a-file").write_text("not a directory", encoding="utf-8")
    out = out.format(run=d, tmp=tmp_path)
    code = main(["plot", str(d), "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and f"megagpt plot: error: --out {out}: {needle}" in err, err
    assert "Traceback" not in err and not list(tmp_path.rglob("*.png"))
