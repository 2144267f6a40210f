#!/usr/bin/env bash
# Start trntrain on this node with torchrun: one node, or one node of many.
#
#   launch/torchrun.sh [hydra overrides ...]
#
# Variables (defaults in brackets):
#   NPROC_PER_NODE  worker processes on this node [on a Trainium host one per
#                   NeuronCore: NEURON_RT_NUM_CORES, else the cores neuron-ls reports,
#                   else the /dev/neuron* devices x NEURON_CORES_PER_DEVICE (2, Trn1):
#                   32 on trn1.32xlarge; elsewhere the CPU cores, at most 4]
#   NNODES          nodes in the job [1]
#   NODE_RANK       unused with c10d rendezvous (torchrun assigns it); kept for logs
#   MASTER_ADDR     rendezvous host, reachable from every node [127.0.0.1]
#   MASTER_PORT     rendezvous port [29500]
#   RDZV_ID         job id shared by the nodes [trntrain]
#   MAX_RESTARTS    torchrun restarts after a failure, resuming from checkpoints [0]
#   TRNTRAIN_BIN    directory holding torchrun [.venv/bin of this checkout]
#   NOFILE_LIMIT    open-file limit to raise the soft limit to [65535, at most the hard one]
#   DRY_RUN=1       print the command and environment instead of running them
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${TRNTRAIN_BIN:-$here/.venv/bin}
cores=$(nproc)

# NeuronCores of this host: 0 when it has none.
neuron_cores() {
  if [ -n "${NEURON_RT_NUM_CORES:-}" ]; then
    echo "$NEURON_RT_NUM_CORES"
    return
  fi
  local n=0
  if command -v neuron-ls >/dev/null 2>&1; then
    # neuron-ls --json-output: one object per device, with its "nc_count".
    n=$({ neuron-ls --json-output 2>/dev/null || true; } |
        { grep -o '"nc_count": *[0-9]*' || true; } | awk -F: '{ n += $2 } END { print n + 0 }')
  fi
  if [ "$n" -eq 0 ]; then
    local device
    for device in "${NEURON_DEVICE_DIR:-/dev}"/neuron[0-9]*; do
      [ -e "$device" ] && n=$((n + ${NEURON_CORES_PER_DEVICE:-2}))
    done
  fi
  echo "$n"
}

neuron=$(neuron_cores)
if [ "$neuron" -gt 0 ]; then
  default_procs=$neuron
else
  default_procs=$(( cores < 4 ? cores : 4 ))
fi
nproc_per_node=${NPROC_PER_NODE:-$default_procs}
nnodes=${NNODES:-1}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
threads=$(( cores / nproc_per_node > 0 ? cores / nproc_per_node : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}

# Every rank opens sockets to its peers (gloo, the rendezvous store, EFA's helpers):
# at scale more than the usual 1024 descriptors. Raise the soft limit to NOFILE_LIMIT,
# or to the hard limit where that is lower.
want=${NOFILE_LIMIT:-65535}
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  want=$hard
fi
ulimit -n "$want"

if [ "$nnodes" -eq 1 ]; then
  rendezvous=(--standalone)
else
  rendezvous=(--rdzv-backend=c10d "--rdzv-endpoint=$master_addr:$master_port"
              "--rdzv-id=${RDZV_ID:-trntrain}")
fi
cmd=("$bin/torchrun" "--nnodes=$nnodes" "--nproc-per-node=$nproc_per_node"
     "${rendezvous[@]}" "--max-restarts=${MAX_RESTARTS:-0}" -m trntrain train "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "# node ${NODE_RANK:-0} of $nnodes"
  echo "export OMP_NUM_THREADS=$OMP_NUM_THREADS"
  echo "ulimit -n $(ulimit -n)"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
