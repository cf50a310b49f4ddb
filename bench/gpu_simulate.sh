#!/usr/bin/env bash
# Simulated workers on one GPU: images/s of ResNet-56 (CIFAR size) with K = 32 workers x
# local batch 128, for the batched path, the sequential path and one model at batch 4096.
# Needs a CUDA device; prints a short table and writes bench/results/gpu_simulate.json.
# Extra arguments go to bench/gpu_simulate.py (e.g. --steps 12).
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON if set, else the project's .venv, else python3
PY=${PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
PY=${PY:-python3}
PYTHONPATH=. "$PY" bench/gpu_simulate.py "$@"
