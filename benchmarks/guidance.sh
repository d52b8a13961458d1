#!/usr/bin/env bash
# Guidance toward a topic (issue 22), the committed runs: trains the guide of `wiki-small-topics` (a micro encoder of
# noised text, 1,000 steps: ~2 minutes on one core) unless it exists, then
#   benchmarks/label_gap.py  -> benchmarks/results/label_gap/wiki-small-topics  (has the model learned its label?)
#   benchmarks/guidance.py   -> benchmarks/results/guidance                     (does guidance steer? judged independently)
# About 40 minutes on one core of an AMD EPYC (x86_64, no AVX-512), one thread:
#
#   bash benchmarks/guidance.sh [CORE]          # default core 0; CHECKPOINT=runs/... GUIDE=runs/... to override
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
CORE="${1:-0}"
CHECKPOINT="${CHECKPOINT:-wiki-small-topics}"
GUIDE="${GUIDE:-runs/wiki-small-topics-guide}"
if [ ! -f "$GUIDE/model.safetensors" ]; then
  taskset -c "$CORE" "$PY" -m textdiffusion train-guide --checkpoint "$CHECKPOINT" --dataset wiki-vital \
    --label-column topic --steps 1000 --output-dir "$GUIDE"
fi
taskset -c "$CORE" "$PY" benchmarks/label_gap.py --checkpoint "$CHECKPOINT" --out benchmarks/results/label_gap/wiki-small-topics
taskset -c "$CORE" "$PY" benchmarks/guidance.py --checkpoint "$CHECKPOINT" --guide "$GUIDE" --out benchmarks/results/guidance
