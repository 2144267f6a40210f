#!/usr/bin/env bash
# The one-GPU check of backend=cuda, in one run of under 8 minutes: the parity checks
# of tests/gpu/test_cuda.py (every single-process feature against eager CPU, DCP resume,
# HF export, nonfinite=skip, evaluation, peak memory against the planner), then the MFU
# benchmark (tests/gpu/bench_mfu.py). Installs nothing: trntrain runs from this checkout,
# and hydra-core, omegaconf and antlr4 come from the wheels in .whl where the machine's
# python3 lacks them (tests/gpu/wheels.sh fetches them).
#
#   tests/gpu/run.sh [RESULTS_DIR]     (default: $OUT, else gpu-results)
#
# Writes env.txt, parity.log, junit.xml, parity.json, bench.log, bench.json and
# bench.md to RESULTS_DIR. Exit status: 0 when every parity check passed and the
# benchmark ran, 1 otherwise, 2 when the run could not start.
# Environment: PYTHON (default python3), PARITY_TIMEOUT_S (180), BENCH_TIMEOUT_S (300),
# BENCH_ARGS (more arguments of bench_mfu.py, e.g. "--cases 1b").
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-${OUT:-gpu-results}}"
py="${PYTHON:-python3}"
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
cd "$root" || exit 2

if ! "$py" -c "import hydra, omegaconf" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "run.sh: $py lacks hydra-core and omegaconf, and .whl/ holds no wheels:" \
             "run tests/gpu/wheels.sh first and carry .whl" >&2
        exit 2
    fi
    site="${TMPDIR:-/tmp}/trntrain-gpu-site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRNTRAIN_GPU_RESULTS="$out" CUBLAS_WORKSPACE_CONFIG=":4096:8"

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse HEAD 2>/dev/null
    nvidia-smi 2>&1
    "$py" -c "import torch, trntrain; print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU');
print('trntrain from', trntrain.__file__)"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

timeout "${PARITY_TIMEOUT_S:-180}" "$py" -m pytest -q -p no:cacheprovider -o addopts="" -rfEs \
    --junitxml="$out/junit.xml" tests/gpu/test_cuda.py 2>&1 | tee "$out/parity.log"
parity=${PIPESTATUS[0]}

# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "${BENCH_TIMEOUT_S:-300}" "$py" -m tests.gpu.bench_mfu --out "$out" \
    --budget-s 240 ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}

echo "run.sh: parity checks exit $parity, benchmark exit $bench; results in $out"
[ "$parity" -eq 0 ] && [ "$bench" -eq 0 ]
