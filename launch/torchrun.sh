#!/usr/bin/env bash
# Start trntrain on this node with torchrun: one node, or one node of many.
#
#   launch/torchrun.sh [hydra overrides ...]
#
# Variables (defaults in brackets):
#   NPROC_PER_NODE  worker processes on this node [cores of this machine, at most 4;
#                   on Trainium: 32 for trn1.32xlarge, 64 for trn2.48xlarge]
#   NNODES          nodes in the job [1]
#   NODE_RANK       unused with c10d rendezvous (torchrun assigns it); kept for logs
#   MASTER_ADDR     rendezvous host, reachable from every node [127.0.0.1]
#   MASTER_PORT     rendezvous port [29500]
#   RDZV_ID         job id shared by the nodes [trntrain]
#   MAX_RESTARTS    torchrun restarts after a failure, resuming from checkpoints [0]
#   TRNTRAIN_BIN    directory holding torchrun [.venv/bin of this checkout]
#   DRY_RUN=1       print the command and environment instead of running them
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${TRNTRAIN_BIN:-$here/.venv/bin}
cores=$(nproc)
nproc_per_node=${NPROC_PER_NODE:-$(( cores < 4 ? cores : 4 ))}
nnodes=${NNODES:-1}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
threads=$(( cores / nproc_per_node > 0 ? cores / nproc_per_node : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}

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
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
