#!/usr/bin/env bash
# The repeated-data comparison (issue 24): masked diffusion against the same-size AR model on U unique tokens
# seen for many epochs, each side's best chosen on validation and reported on a test split.
#
#   bash benchmarks/repeated_data.sh          # CPU: preset mini (0.8M), U = 10k and 25k tokens of wiki-vital,
#                                             # two runs at a time, one core each (about 1 h on 2 cores)
#   bash benchmarks/repeated_data.sh --gpu    # GPU: preset small (~10M), U = 0.1M / 0.3M / 1M tokens
#
# Interrupted? Run the same command again: finished runs are kept, an unfinished one resumes from its last
# evaluation. Results: benchmarks/results/repeated_data[-gpu]/results.md, results.json, repeated_data.png and
# each run's done.json (its curve). The runs' best models (best-EPOCH/ folders) are not committed (.gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${1:-}" = "--gpu" ]; then
  HF_HUB_OFFLINE=1 $PY -m textdiffusion experiment repeated-data --device cuda --preset small --vocab-size 4096 \
    --budgets 100000 300000 1000000 --epochs 150 600 --ar-epochs 16 48 --batch-size 64 --validation-blocks 256 \
    --nelbo-samples 4 --evals 60 --output-dir benchmarks/results/repeated_data-gpu
else
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $PY -m textdiffusion experiment repeated-data --nelbo-samples 2 --workers 2 \
    --output-dir benchmarks/results/repeated_data
fi
