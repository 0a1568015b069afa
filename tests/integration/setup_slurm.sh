#!/usr/bin/env bash
# setup_slurm.sh -- install Slurm from Debian's packages and start a throw-away 2-node cluster on
# loopback, for tests/integration/test_slurm.py (and .ci/run). Idempotent: packages already
# installed are not reinstalled, daemons already running are left alone.
#
#   setup_slurm.sh [up]     install if needed, write configs, start munged + slurmctld + 2 slurmd
#   setup_slurm.sh down     stop the daemons this script started (by PID, from our pid files)
#   setup_slurm.sh purge    down, then remove the lab directory
#   setup_slurm.sh env      print the `export SLURM_CONF=...` line every Slurm client needs
#
# Knobs (environment):
#   MEGAGPT_SLURM_DIR=/tmp/megagpt-slurm   configs, state, logs, pid files, sockets (never /etc)
#   MEGAGPT_SLURM_PORT=17817               slurmctld port; the slurmd of node i listens on PORT+i
#   MEGAGPT_SLURM_NODES=2                  emulated nodes, named 127.0.0.1, 127.0.0.2, ...
#   MEGAGPT_SLURM_GPUS=2                   fake GPUs per node (char devices cloned from /dev/null)
#
# Following shared/reference/slurm-local-cluster.md (Debian 12, Slurm 22.05): node names are IP
# literals so MASTER_ADDR resolves without DNS; every node's NodeAddr is 127.0.0.1 and the per-node
# Port tells the slurmd apart; cred_expire=5 so a requeued job restarts in seconds, not minutes;
# no accounting (wait with `sbatch --wait` or `scontrol show job`). Runs as root.
set -euo pipefail

LAB=${MEGAGPT_SLURM_DIR:-/tmp/megagpt-slurm}
PORT=${MEGAGPT_SLURM_PORT:-17817}
NODES=${MEGAGPT_SLURM_NODES:-2}
GPUS=${MEGAGPT_SLURM_GPUS:-2}
CONF=$LAB/etc/slurm.conf
export SLURM_CONF=$CONF  # always: without it Slurm clients look the config up in DNS

node_names() { local i; for i in $(seq 1 "$NODES"); do echo "127.0.0.$i"; done; }

install_packages() {
  local missing=()
  for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "setup_slurm.sh: ${missing[*]} missing and not root: cannot apt-get install" >&2
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
}

write_config() {
  mkdir -p "$LAB"/{etc,munge,munge-run,state,log,run,dev}
  chmod 755 "$LAB" "$LAB/munge-run"  # munged wants its socket directory (and parents) o+x
  chmod 700 "$LAB/munge"
  [ -s "$LAB/munge/munge.key" ] || mungekey --create --keyfile="$LAB/munge/munge.key"
  local comm="# hostname is not 127.0.0.1 in /etc/hosts: daemons listen on 0.0.0.0"
  local haddr
  haddr=$(awk -v h="$(hostname)" '$1 ~ /^[0-9.]+$/ {for (i = 2; i <= NF; i++)
          if ($i == h) {print $1; exit}}' /etc/hosts)
  # NoInAddrAny binds daemons and srun to the hostname's address: only safe when it is 127.0.0.1.
  [ "$haddr" = 127.0.0.1 ] && comm="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  cat > "$CONF" <<EOF
ClusterName=megagpt-lab
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$LAB/munge-run/munge.socket,cred_expire=5
StateSaveLocation=$LAB/state
SlurmdSpoolDir=$LAB/spool/slurmd-%n
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd-%n.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
EnforcePartLimits=ALL
KillWait=10
SlurmdTimeout=30
MessageTimeout=5
MailProg=/bin/true
SlurmdParameters=config_overrides
$comm
EOF
  local gres="" i=0 n
  if [ "$GPUS" -gt 0 ]; then
    echo "GresTypes=gpu" >> "$CONF"
    gres="Gres=gpu:$GPUS"
    : > "$LAB/etc/gres.conf"
    for i in $(seq 0 $((GPUS - 1))); do
      [ -c "$LAB/dev/nvidia$i" ] || mknod "$LAB/dev/nvidia$i" c 1 3
    done
    for n in $(node_names); do
      echo "NodeName=$n Name=gpu File=$LAB/dev/nvidia[0-$((GPUS - 1))]" >> "$LAB/etc/gres.conf"
    done
  fi
  i=0
  for n in $(node_names); do
    i=$((i + 1))
    mkdir -p "$LAB/spool/slurmd-$n"
    echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=16" \
         "RealMemory=16000 $gres State=UNKNOWN" >> "$CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
}

# our daemon is alive: its pid file names a live, non-zombie process started with our lab dir
alive() {
  [ -s "$1" ] || return 1
  local p st
  p=$(cat "$1")
  st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -qF "$LAB/"
}

up() {
  install_packages
  if alive "$LAB/run/slurmctld.pid"; then
    : # running: keep its config (changing it under a live controller would confuse it)
  else
    write_config
  fi
  alive "$LAB/munge-run/munged.pid" || munged --key-file="$LAB/munge/munge.key" \
      --socket="$LAB/munge-run/munge.socket" --pid-file="$LAB/munge-run/munged.pid" \
      --log-file="$LAB/munge/munged.log" --seed-file="$LAB/munge/munged.seed" --origin=127.0.0.1
  alive "$LAB/run/slurmctld.pid" || slurmctld -f "$CONF"
  local n t
  for n in $(node_names); do
    alive "$LAB/run/slurmd-$n.pid" || slurmd -f "$CONF" -N "$n"
  done
  for t in $(seq 1 150); do
    if [ "$(sinfo -h -N -t idle,alloc,mix -o '%N' 2>/dev/null | sort -u | wc -l)" = "$NODES" ]; then
      echo "slurm up: $NODES node(s); export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.2
  done
  echo "setup_slurm.sh: nodes did not become idle; logs in $LAB/log" >&2
  sinfo -R >&2 || true
  return 1
}

down() {
  local f p pids=() t
  for f in "$LAB"/run/slurmd-*.pid "$LAB/run/slurmctld.pid" "$LAB/munge-run/munged.pid"; do
    if alive "$f"; then p=$(cat "$f"); kill "$p"; pids+=("$p"); fi
  done
  for t in $(seq 1 100); do  # SIGTERM all at once, then wait (a zombie counts as gone)
    local left=()
    for p in "${pids[@]}"; do
      st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || true)
      [ -n "$st" ] && [ "$st" != Z ] && left+=("$p")
    done
    pids=("${left[@]}")
    [ ${#pids[@]} -eq 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p"; done
  rm -f "$LAB"/run/*.pid "$LAB/munge-run/munged.pid"
  echo "slurm down"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  purge) down; rm -rf "$LAB" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 [up|down|purge|env]" >&2; exit 2 ;;
esac
