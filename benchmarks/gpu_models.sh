#!/usr/bin/env bash
# One GPU command refreshes the ready models: trains, evaluates and exports, in about 6 minutes on one GPU.
#
#   bash benchmarks/gpu_models.sh                 # CUDA: recipes/wiki-gpu.yaml and recipes/mpnet-wiki-gpu.yaml, bf16
#   bash benchmarks/gpu_models.sh --cpu-smoke     # the same pipeline, shortened, on the CPU (about a minute)
#   bash benchmarks/gpu_models.sh --models smollm2-bd     # one of the opt-in models; --help lists every flag
#
# The pipeline is benchmarks/gpu_models.py (its docstring says what each step writes); this wrapper picks the
# project's Python ($PYTHON, else .venv/bin/python, else python3) and runs it from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" benchmarks/gpu_models.py "$@"
