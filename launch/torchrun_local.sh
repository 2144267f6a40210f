#!/usr/bin/env bash
# Train on this machine with NPROC worker processes (default: one per CPU core, at
# most 4), e.g.  NPROC=2 launch/torchrun_local.sh train.max_steps=100
# Every argument is a Hydra override of `trntrain train`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${TRNTRAIN_BIN:-$here/.venv/bin}
cores=$(nproc)
nproc=${NPROC:-$(( cores < 4 ? cores : 4 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
exec "$bin/torchrun" --standalone --nproc_per_node="$nproc" -m trntrain train "$@"
