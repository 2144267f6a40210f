#!/usr/bin/env bash
# Wheels of trntrain's dependencies that the GPU machine's image lacks (hydra-core,
# omegaconf and antlr4-python3-runtime, all pure Python) into .whl/, for tests/gpu/run.sh
# to install there without a network. Run here, where pip reaches a package index.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py="${PYTHON:-python3}"
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4"
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published as a source archive
# only: built here into a pure-Python wheel.
"$py" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
ls -l .whl
