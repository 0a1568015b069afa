#!/usr/bin/env bash
# Multi-node megagpt pretraining with the DeepSpeed launcher and a hostfile, WITHOUT SSH: run
# this on every node with its own --node-rank (DeepSpeed's --no_ssh mode; the hostfile only
# gives the nodes and their GPU slots). Topology only: hyperparameters come from the config.
#
#   hostfile:   node-a slots=8
#               node-b slots=8
#   launch/deepspeed.sh --hostfile hostfile --node-rank 0 CONFIG [KEY=VALUE ...]   # on node-a
#   launch/deepspeed.sh --hostfile hostfile --node-rank 1 CONFIG [KEY=VALUE ...]   # on node-b
#
# Options (or the environment variable in brackets):
#   --hostfile FILE      "HOST slots=N" per line [HOSTFILE], required
#   --node-rank R        this node's line in the hostfile, from 0 [NODE_RANK]
#   --master-addr HOST   rendezvous address [MASTER_ADDR], default: the hostfile's first host
#   --master-port PORT   rendezvous port [MASTER_PORT], default 29500
#   --python PY          interpreter with deepspeed and megagpt [MEGAGPT_PYTHON], default python3
#
# Stop with SIGTERM: the ranks save a checkpoint and exit; rerunning resumes from it.
set -euo pipefail

die() { echo "deepspeed.sh: error: $*" >&2; exit 2; }

HOSTFILE=${HOSTFILE:-}
NODE_RANK=${NODE_RANK:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
PY=${MEGAGPT_PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) HOSTFILE=${2:?--hostfile needs a value}; shift 2 ;;
    --node-rank) NODE_RANK=${2:?--node-rank needs a value}; shift 2 ;;
    --master-addr) MASTER_ADDR=${2:?--master-addr needs a value}; shift 2 ;;
    --master-port) MASTER_PORT=${2:?--master-port needs a value}; shift 2 ;;
    --python) PY=${2:?--python needs a value}; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
done
[ -n "$HOSTFILE" ] || die "--hostfile is required (lines 'HOST slots=N')"
[ -f "$HOSTFILE" ] || die "--hostfile '$HOSTFILE' not found"
[ $# -ge 1 ] || die "missing CONFIG (usage: launch/deepspeed.sh [options] CONFIG [KEY=VALUE ...])"
CONFIG=$1
shift
[ -f "$CONFIG" ] || die "config '$CONFIG' not found"
for kv in "$@"; do
  case "$kv" in *=*) ;; *) die "extra argument '$kv' is not KEY=VALUE (e.g. train.steps=100)" ;; esac
done
# Every line other than blanks and comments must start "HOST slots=N" with N >= 1 (DeepSpeed's
# reading, which ignores the rest of the line): a line that does not would be skipped by the count
# below (shifting every node rank after it), and a host with no slot starts no process.
bad=$(grep -nvE '^[[:space:]]*(#.*)?$|^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=0*[1-9][0-9]*([^0-9].*)?$' \
  "$HOSTFILE" | head -n 1 || true)
[ -z "$bad" ] || die "--hostfile $HOSTFILE:${bad%%:*}: '${bad#*:}' is not 'HOST slots=N' with N >= 1"
hosts=$(grep -cE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" || true)
[ "${hosts:-0}" -ge 1 ] || die "--hostfile '$HOSTFILE' has no 'HOST slots=N' line"
case "$NODE_RANK" in
  '' | *[!0-9]*) die "--node-rank is required: this node's line in the hostfile, 0..$((hosts - 1))" ;;
esac
[ "$NODE_RANK" -lt "$hosts" ] || die "--node-rank $NODE_RANK is outside 0..$((hosts - 1)) ($HOSTFILE)"
case "$MASTER_PORT" in
  '' | *[!0-9]*) die "--master-port must be a port in 1..65535, got '$MASTER_PORT'" ;;
esac
[ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || die "--master-port must be a port in 1..65535, got '$MASTER_PORT'"
command -v "$PY" >/dev/null || die "--python '$PY' not found (the interpreter with deepspeed and megagpt)"
[ -n "$MASTER_ADDR" ] || MASTER_ADDR=$(awk '$0 !~ /^[[:space:]]*#/ && NF {print $1; exit}' "$HOSTFILE")

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$ROOT/megagpt/cli.py" ] && export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

echo "[deepspeed.sh] node $NODE_RANK of $hosts ($HOSTFILE), rendezvous $MASTER_ADDR:$MASTER_PORT:" \
     "megagpt train --config $CONFIG $*"
exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank \
  --module megagpt.cli train --config "$CONFIG" "$@"
