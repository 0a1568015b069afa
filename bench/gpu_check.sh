#!/usr/bin/env bash
# One command on a CUDA machine that has torch (+ transformers, triton) and no network:
# install megagpt's other dependencies from a wheelhouse (tools/wheelhouse.sh), then, within
# GPU_CHECK_SECONDS (default 480), run
#   1. python -m pytest tests/gpu          (bf16 vs fp32 losses, flash, MFU, serving on CUDA)
#   2. bench/train_step.py gpt3-1.3b, seq 2048, bf16, micro auto: tokens/s against HF, MFU, the
#      planner's memory prediction against torch.cuda.max_memory_allocated, and one profiled
#      step per side (kernel time by kind against the wall time: where MFU goes)
#   3. bench/generate.py                   (generation against HF generate, batch 1 and 8, beams)
# and append everything to one markdown report. Every stage runs under `timeout`; one failing
# does not stop the others; the exit status is non-zero when any stage failed.
#
#   bench/gpu_check.sh [WHEELHOUSE] [--out REPORT] [--skip-install]
#
# WHEELHOUSE defaults to ./wheelhouse; REPORT to $OUT/gpu_report.md when $OUT is set, else
# ./gpu_report.md. docs/gpu.md says what this verifies.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELHOUSE=""
REPORT=""
INSTALL=1
# $PYTHON, else `python`, else `python3` (images with only python3, such as the H200's).
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
TOTAL_S=${GPU_CHECK_SECONDS:-480}

usage() {
    echo "usage: bench/gpu_check.sh [WHEELHOUSE] [--out REPORT] [--skip-install]"
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) REPORT=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        --skip-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
        *) WHEELHOUSE=$1; shift ;;
    esac
done
WHEELHOUSE=${WHEELHOUSE:-$ROOT/wheelhouse}
if [[ -z "$REPORT" ]]; then
    REPORT=${OUT:+$OUT/}gpu_report.md
fi
if [[ $INSTALL == 1 && ! -f "$WHEELHOUSE/requirements.txt" ]]; then
    echo "gpu_check.sh: no wheelhouse at '$WHEELHOUSE' (no requirements.txt there)." >&2
    echo "  Build one on a machine with network:" >&2
    echo "    tools/wheelhouse.sh --python 3.12 --platform manylinux_2_28_x86_64 --out wheelhouse" >&2
    echo "  and pass its path, or --skip-install when megagpt's dependencies are installed." >&2
    exit 2
fi
mkdir -p "$(dirname "$REPORT")"

cd "$ROOT" || exit 2
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=8
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
# The checkout is what runs (a wheel of megagpt in the wheelhouse may be older than it).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
NAMES=() CODES=() SECS=()
FAILED=0

say() { echo "$*" | tee -a "$REPORT"; }

# stage NAME CAP_SECONDS COMMAND...: run under timeout (the cap, or what is left of TOTAL_S),
# output into the report in a code block, exit status recorded.
stage() {
    local name=$1 cap=$2 left t0 code
    shift 2
    left=$((TOTAL_S - ($(date +%s) - START)))
    if (( cap > left )); then
        cap=$left
    fi
    say ""
    say "## $name"
    say ""
    say "\`$*\`"
    say ""
    if (( cap < 15 )); then
        say "skipped: ${left}s of the ${TOTAL_S}s budget left"
        NAMES+=("$name") CODES+=("skipped") SECS+=(0)
        FAILED=1
        return
    fi
    say '```'
    t0=$(date +%s)
    # bash -c: a stage may be one of the exported functions below; timeout signals its whole
    # process group (pytest's worker processes included).
    timeout -k 15 "$cap" bash -c '"$@"' stage "$@" 2>&1 | tee -a "$REPORT"
    code=${PIPESTATUS[0]}
    say '```'
    local took=$(($(date +%s) - t0))
    if (( code == 124 || code == 137 )); then
        say "exit $code: stopped by the ${cap}s timeout after ${took}s"
    else
        say "exit $code after ${took}s"
    fi
    NAMES+=("$name") CODES+=("$code") SECS+=("$took")
    if (( code != 0 )); then
        FAILED=1
    fi
}

install_deps() {
    local log flags=()
    log=$(mktemp)
    # A wheelhouse built with --leave-out pins every package and asks for no resolution.
    if grep -q '^# install: --no-deps' "$WHEELHOUSE/requirements.txt"; then
        flags+=(--no-deps)
        grep '^# Left out' "$WHEELHOUSE/requirements.txt"
    fi
    if ! "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" "${flags[@]}" \
            -r "$WHEELHOUSE/requirements.txt" >"$log" 2>&1; then
        if grep -q externally-managed-environment "$log"; then
            echo "(system Python marked externally managed: retrying with --break-system-packages)"
            "$PY" -m pip install --break-system-packages --no-index --find-links "$WHEELHOUSE" \
                "${flags[@]}" -r "$WHEELHOUSE/requirements.txt" >"$log" 2>&1 \
                || { cat "$log"; return 1; }
        else
            cat "$log"
            return 1
        fi
    fi
    grep -E "^(Successfully installed|ERROR|WARNING)" "$log"
    "$PY" -m pip check || true  # conflicts with what the node had: reported, not fatal
}

versions() {
    "$PY" - <<'EOF'
import importlib.metadata as m
for name in ("torch", "triton", "transformers", "deepspeed", "megatron-core", "numpy",
             "pydantic", "tokenizers", "pytest"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} (not installed)")
import importlib
for module in ("torch", "megagpt", "deepspeed", "megatron.core", "pydantic", "jieba", "rjieba",
               "sacrebleu", "rouge_score", "wandb", "sentencepiece", "tokenizers", "safetensors"):
    try:
        m = importlib.import_module(module)
        print(f"import {module}: ok ({getattr(m, '__file__', '')})")
    except Exception as e:  # report every missing piece, not the first
        print(f"import {module}: FAILED {type(e).__name__}: {e}")
try:
    import torch
    print("cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count(),
          "| bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
except Exception as e:
    print(f"torch: {type(e).__name__}: {e}")
EOF
}

env_info() {
    nvidia-smi
    echo
    versions
}
export -f install_deps versions env_info
export PY WHEELHOUSE

GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
      | head -1)
TORCH=$("$PY" -c "import torch; print(torch.__version__, '| CUDA', torch.version.cuda)" \
        2>/dev/null)
{
    echo ""
    echo "# megagpt GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo ""
    echo "- GPU: ${GPU:-none found by nvidia-smi} (name, driver, memory)"
    echo "- torch: ${TORCH:-not importable}; Python $("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null)"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "- host: $(hostname), $(nproc --all) CPUs; budget ${TOTAL_S}s"
} | tee -a "$REPORT"

if [[ $INSTALL == 1 ]]; then
    stage "install from $WHEELHOUSE" 90 install_deps
fi
stage "nvidia-smi and versions" 30 env_info
stage "tests/gpu" 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu
stage "train step: gpt3-1.3b at seq 2048, bf16 (MFU, planner memory)" 150 \
    "$PY" bench/train_step.py --sizes gpt3-1.3b --seq 2048 --precision bf16 \
    --micro auto --accum 4 --warmup 2 --iters 4 --profile
stage "generation against HF (gpt3-base, bf16)" 120 "$PY" bench/generate.py --size gpt3-base \
    --prompts 8 --prompt-tokens 32 --new-tokens 64 --device cuda --dtype bf16 --hf-lookup 0 \
    --beams 4

say ""
say "## summary ($(($(date +%s) - START))s)"
say ""
say "| stage | exit | seconds |"
say "|---|---|---|"
for i in "${!NAMES[@]}"; do
    say "| ${NAMES[$i]} | ${CODES[$i]} | ${SECS[$i]} |"
done
echo "report: $REPORT"
exit $FAILED
