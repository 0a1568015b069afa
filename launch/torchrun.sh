#!/usr/bin/env bash
# Multi-node megagpt pretraining with torchrun, no Slurm and no SSH: run this on EVERY node,
# each with its own --node-rank; all of them meet at --master-addr:--master-port (node 0).
# Topology only: every hyperparameter comes from the config.
#
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 CONFIG [KEY=VALUE ...]
#   launch/torchrun.sh --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 CONFIG [KEY=VALUE ...]
#
# Options (or the environment variable in brackets):
#   --nnodes N            nodes taking part [NNODES], default 1
#   --node-rank R         this node, 0 .. N-1 [NODE_RANK], default 0
#   --master-addr HOST    address of node 0, reachable from every node [MASTER_ADDR];
#                         default 127.0.0.1 (single node only)
#   --master-port PORT    rendezvous port on node 0 [MASTER_PORT], default 29500
#   --nproc-per-node G    processes per node [NPROC_PER_NODE], default: GPUs on this node
#                         (nvidia-smi -L), else 1
#   --python PY           interpreter with torch and megagpt [MEGAGPT_PYTHON], default python3
#   --max-restarts N      restarts of the whole job after a rank dies [MAX_RESTARTS], default 3;
#                         each resumes from <run.dir>/checkpoints/latest. 0 = fail at once
#   --rdzv-id ID          job id, the same on every node [RDZV_ID], default megagpt-<port>
#
# Rendezvous: c10d (torchrun's elastic rendezvous) at --master-addr:--master-port, with a fresh
# store per attempt (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): a restart never sees the dead
# attempt's addresses. Global ranks are assigned by the rendezvous, so rank 0 need not be on
# node 0; --node-rank only says which node hosts the rendezvous (0).
#
# Stop: SIGTERM (or Ctrl-C) to this script's process; torchrun forwards it, every rank finishes
# its step, saves a checkpoint and exits. Restarting the same command resumes from
# <run.dir>/checkpoints/latest. NCCL_* variables in the environment are passed through.
set -euo pipefail

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PY=${MEGAGPT_PYTHON:-python3}
NPROC=${NPROC_PER_NODE:-}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_ID=${RDZV_ID:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) NNODES=${2:?--nnodes needs a value}; shift 2 ;;
    --node-rank) NODE_RANK=${2:?--node-rank needs a value}; shift 2 ;;
    --master-addr) MASTER_ADDR=${2:?--master-addr needs a value}; shift 2 ;;
    --master-port) MASTER_PORT=${2:?--master-port needs a value}; shift 2 ;;
    --nproc-per-node) NPROC=${2:?--nproc-per-node needs a value}; shift 2 ;;
    --python) PY=${2:?--python needs a value}; shift 2 ;;
    --max-restarts) MAX_RESTARTS=${2:?--max-restarts needs a value}; shift 2 ;;
    --rdzv-id) RDZV_ID=${2:?--rdzv-id needs a value}; shift 2 ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "missing CONFIG (usage: launch/torchrun.sh [options] CONFIG [KEY=VALUE ...])"
CONFIG=$1
shift
[ -f "$CONFIG" ] || die "config '$CONFIG' not found"
for kv in "$@"; do
  case "$kv" in *=*) ;; *) die "extra argument '$kv' is not KEY=VALUE (e.g. train.steps=100)" ;; esac
done
if [ -z "$NPROC" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=1
fi
isint() { case "$1" in '' | *[!0-9]*) return 1 ;; esac; }
isint "$NNODES" && [ "$NNODES" -ge 1 ] || die "--nnodes must be a positive integer, got '$NNODES'"
isint "$NPROC" && [ "$NPROC" -ge 1 ] || die "--nproc-per-node must be a positive integer, got '$NPROC'"
isint "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || die "--master-port must be a port in 1..65535, got '$MASTER_PORT'"
isint "$MAX_RESTARTS" || die "--max-restarts must be an integer >= 0, got '$MAX_RESTARTS'"
isint "$NODE_RANK" && [ "$NODE_RANK" -lt "$NNODES" ] \
  || die "--node-rank must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
command -v "$PY" >/dev/null || die "--python '$PY' not found (the interpreter with torch and megagpt)"
if [ "$NNODES" -gt 1 ] && [ "$MASTER_ADDR" = 127.0.0.1 ] && [ -z "${MEGAGPT_ALLOW_LOOPBACK:-}" ]; then
  die "--master-addr is required with --nnodes > 1 (the address of node 0)"
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$ROOT/megagpt/cli.py" ] && export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# A new rendezvous store per attempt (see the header): restarts that reuse torchrun's shared
# store can read the previous attempt's addresses and die in rendezvous.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
IS_HOST=false
[ "$NODE_RANK" = 0 ] && IS_HOST=true

echo "[torchrun.sh] node $NODE_RANK of $NNODES x $NPROC process(es), rendezvous" \
     "$MASTER_ADDR:$MASTER_PORT (c10d, up to $MAX_RESTARTS restart(s)):" \
     "megagpt train --config $CONFIG $*"
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="${RDZV_ID:-megagpt-$MASTER_PORT}" --rdzv-conf="is_host=$IS_HOST" \
  --max-restarts="$MAX_RESTARTS" -m megagpt.cli train --config "$CONFIG" "$@"
