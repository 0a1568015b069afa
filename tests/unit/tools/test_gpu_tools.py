"""What can be checked on the CPU of the GPU tooling: tools/wheelhouse.sh, bench/gpu_check.sh,
bench/train_step.py's micro-batch search (docs/gpu.md). tests/gpu's attention helper is checked
on the CPU in tests/distributed/test_gpu_helpers.py (it sets up a process group)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
WHEELHOUSE = ROOT / "tools" / "wheelhouse.sh"
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"


def _train_step_module():
    spec = importlib.util.spec_from_file_location(
        "bench_train_step", ROOT / "bench" / "train_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", [WHEELHOUSE, GPU_CHECK], ids=lambda p: p.name)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_without_wheelhouse_stops_at_once_and_says_how_to_build_one(tmp_path):
    report = tmp_path / "r.md"
    proc = subprocess.run(
        ["bash", str(GPU_CHECK), str(tmp_path / "missing"), "--out", str(report)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "no wheelhouse at" in proc.stderr and "tools/wheelhouse.sh" in proc.stderr
    assert not report.exists()  # nothing ran


def test_wheelhouse_requires_out():
    proc = subprocess.run(
        ["bash", str(WHEELHOUSE), "--python", "3.12"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--out DIR is required" in proc.stderr


class FakeOOM(Exception):
    pass


def test_micro_auto_takes_the_largest_that_fits_and_frees_between_tries():
    ts = _train_step_module()
    tried, cleanups = [], []

    def attempt(micro):
        tried.append(micro)
        if micro > 4:
            raise FakeOOM(f"micro {micro}")
        return f"ran {micro}"

    micro, result, too_big = ts.largest_that_fits(
        [1, 2, 4, 8, 16, 8],
        attempt,
        lambda e: isinstance(e, FakeOOM),
        lambda: cleanups.append(len(tried)),
    )
    assert (micro, result, too_big) == (4, "ran 4", [16, 8])
    assert tried == [16, 8, 4]  # largest first, each once
    assert cleanups == [1, 2]  # after each failure, before the next try


def test_micro_auto_other_errors_propagate_and_none_fitting_says_so():
    ts = _train_step_module()

    def broken(micro):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        ts.largest_that_fits([4, 2], broken, lambda e: isinstance(e, FakeOOM))

    def never(micro):
        raise FakeOOM()

    with pytest.raises(MemoryError, match=r"\[4, 2, 1\]"):
        ts.largest_that_fits([1, 2, 4], never, lambda e: isinstance(e, FakeOOM))


def test_cuda_oom_recognised_in_its_forms():
    ts = _train_step_module()
    assert ts.is_cuda_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert ts.is_cuda_oom(RuntimeError("CUDA error: out of memory"))
    assert ts.is_cuda_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not ts.is_cuda_oom(RuntimeError("shape mismatch"))
    assert not ts.is_cuda_oom(MemoryError())  # host memory: not the GPU's


def test_planner_prediction_the_bench_prints_excludes_the_cuda_reserve():
    from megagpt.config import load_config
    from megagpt.planner.memory import CUDA_RESERVE_BYTES, Layout, memory_per_stage, peak_stage

    ts = _train_step_module()
    cfg = load_config(
        None,
        [
            "model.name=gpt3-large",
            "model.seq_length=2048",
            "train.precision=bf16",
            "train.micro_batch_size=4",
            "train.global_batch_size=16",
        ],
    )
    full = peak_stage(
        memory_per_stage(
            cfg.model,
            Layout.from_config(cfg, 1),
            precision="bf16",
            global_batch=16,
            flash=True,
            cuda=True,
        )
    ).total
    assert ts.planner_bytes(cfg, cfg.parallel.zero_stage) == full - CUDA_RESERVE_BYTES


def _imports_in(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `from module import name` in a file, nested ones too."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.lineno, node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        for alias in node.names
    ]


@pytest.mark.parametrize(
    "path", sorted((ROOT / "tests" / "gpu").glob("*.py")), ids=lambda p: p.name
)
def test_what_the_gpu_tests_import_exists(path):
    """tests/gpu skips without CUDA, so a renamed helper it imports inside a test would only
    show on a GPU (the first GPU run met `_twin`, renamed away in tests/unit/serving): every
    `from module import name` in those files must resolve here."""
    import importlib

    missing = []
    for line, module, name in _imports_in(path):
        mod = importlib.import_module(module)
        if name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{path.name}:{line}: {module}.{name}")
    assert not missing, f"the GPU tests import names that do not exist: {missing}"


@pytest.mark.parametrize("pinned", [True, False], ids=["left-out", "resolved"])
def test_gpu_check_installs_a_pinned_wheelhouse_without_resolving(tmp_path, pinned):
    """A wheelhouse built with --leave-out pins every package and says `# install: --no-deps`;
    gpu_check.sh must pass --no-deps then (pip's resolver would ask for what was left out), and
    only then. Python is a stand-in that records its arguments."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    lines = ["# megagpt wheelhouse"]
    if pinned:
        lines += ["# Left out (megagpt imports them only when a feature asks): wandb jieba"]
        lines += ["# install: --no-deps", "megagpt==0.1.0", "deepspeed==0.19.8"]
    else:
        lines += ["megagpt==0.1.0"]
    (house / "requirements.txt").write_text("\n".join(lines) + "\n")
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(GPU_CHECK), str(house), "--out", str(tmp_path / "r.md")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "GPU_CHECK_SECONDS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    installs = [c for c in calls.read_text().splitlines() if c.startswith("-m pip install")]
    assert installs, proc.stdout + proc.stderr
    assert ("--no-deps" in installs[0]) is pinned, installs
    assert f"-r {house}/requirements.txt" in installs[0]
    assert ("Left out" in proc.stdout) is pinned


def test_wheelhouse_refuses_to_leave_out_what_is_not_installed_and_keeps_the_folder(tmp_path):
    """--leave-out pins a stand-in at the installed version, so a name not installed is an
    error, given before the folder's existing wheels are touched."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "kept-1.0-py3-none-any.whl").write_bytes(b"wheel")
    proc = subprocess.run(
        ["bash", str(WHEELHOUSE), "--out", str(house), "--leave-out", "no-such-package-xyz"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "--leave-out no-such-package-xyz: not installed here" in proc.stderr
    assert (house / "kept-1.0-py3-none-any.whl").exists()


def test_profile_breaks_a_step_down_by_kind():
    """bench/train_step.py --profile: one step under torch.profiler, its time by kind of
    kernel or operator (on CPU, the operators' own time), and the top names."""
    ts = _train_step_module()
    w = torch.nn.Parameter(torch.randn(256, 256))
    opt = torch.optim.AdamW([w], lr=1e-3)
    x = torch.randn(512, 256)

    def step():
        loss = torch.nn.functional.gelu(x @ w).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    p = ts.profile_step(step, lambda: None, cuda=False, top=3)
    assert p["wall_ms"] > 0 and 0 < p["busy_ms"]
    assert p["by_kind"]["GEMM"] > 0 and p["by_kind"]["optimizer"] > 0
    assert "elementwise" in p["by_kind"]  # the GELU and its backward
    assert len(p["top"]) == 3
    lines = ts.format_profile("tiny eager", p)
    assert lines[0].startswith("# profile tiny eager: step ") and "GEMM" in lines[0]
    assert ts.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMM"
    assert ts.kind_of("pytorch_flash::flash_fwd_kernel") == "attention"
    assert ts.kind_of("void at::native::(anonymous)::fused_adamw_kernel") == "optimizer"
