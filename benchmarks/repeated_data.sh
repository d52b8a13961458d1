#!/usr/bin/env bash
# The repeated-data comparison (issue 24): masked diffusion against the same-size AR model on U unique tokens
# seen for many epochs, each side's best chosen on validation and reported on a test split.
#
#   bash benchmarks/repeated_data.sh          # CPU: preset mini (0.8M), U = 10k and 25k tokens of wiki-vital,
#                                             # two runs at a time, one core each (about 1 h on 2 cores)
#   bash benchmarks/repeated_data.sh --follow-ups   # then: regularisers on both sides (U = 10k) and the diffusion
#                                             # model with dropout (U = 25k), reusing the runs they share (~1.3 core-h)
#   bash benchmarks/repeated_data.sh --block  # then: block diffusion (blocks of 4) as a third side at U = 25k, with its
#                                             # own dropout x weight-decay grid, against the follow-up's best AR and
#                                             # diffusion runs (issue 34; about 1 core-hour, one core)
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
elif [ "${1:-}" = "--follow-ups" ]; then
  # the two follow-ups of the CPU grid: regularisers on both sides at U = 10k, and the diffusion model with dropout
  # at U = 25k. Each starts from the main grid's finished runs it shares (a run's folder name is its grid point).
  R=benchmarks/results
  for name in regularisers dropout; do
    mkdir -p "$R/repeated_data-$name.partial"
    [ -d "$R/repeated_data" ] && cp -rn "$R/repeated_data/tokenizer" "$R/repeated_data/experiment_args.json" "$R/repeated_data-$name.partial/"
  done
  [ -d "$R/repeated_data" ] && cp -rn "$R"/repeated_data/U10000-* "$R/repeated_data-regularisers.partial/"
  for run in U25000-ar-lr0.001-e36-drop0.1-wd0.1 U25000-ar-lr0.001-e36-drop0.1-wd1 U25000-diffusion-lr0.001-e600-drop0-wd0.1; do
    [ -d "$R/repeated_data/$run" ] && cp -rn "$R/repeated_data/$run" "$R/repeated_data-dropout.partial/"
  done
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $PY -m textdiffusion experiment repeated-data --budgets 10000 --dropout 0.0 0.1 \
    --ar-dropout 0.0 0.1 0.3 --nelbo-samples 2 --workers 2 --output-dir $R/repeated_data-regularisers
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $PY -m textdiffusion experiment repeated-data --budgets 25000 --learning-rates 1e-3 \
    --epochs 600 --dropout 0.0 0.1 --ar-learning-rates 1e-3 --ar-epochs 36 --ar-dropout 0.0 0.1 --ar-weight-decay 0.1 1.0 \
    --nelbo-samples 2 --workers 2 --output-dir $R/repeated_data-dropout
elif [ "${1:-}" = "--block" ]; then
  # the best AR and diffusion runs of the U = 25k follow-up, then the block side's grid beside them (a run whose best
  # model was not kept, as in a fresh clone, is trained again; with the same seeds it reproduces its curve)
  R=benchmarks/results
  mkdir -p "$R/repeated_data-block.partial"
  for run in tokenizer experiment_args.json U25000-ar-lr0.001-e36-drop0.1-wd1 U25000-diffusion-lr0.001-e600-drop0.1-wd0.1; do
    [ -e "$R/repeated_data-dropout/$run" ] && cp -rn "$R/repeated_data-dropout/$run" "$R/repeated_data-block.partial/"
  done
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $PY -m textdiffusion experiment repeated-data --budgets 25000 --learning-rates 1e-3 \
    --epochs 600 --dropout 0.1 --block-side-sizes 4 --block-epochs 150 --block-dropout 0.1 0.3 \
    --block-weight-decay 0.1 1.0 --ar-learning-rates 1e-3 --ar-epochs 36 --ar-dropout 0.1 --ar-weight-decay 1.0 \
    --nelbo-samples 2 --workers 1 --output-dir $R/repeated_data-block
else
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $PY -m textdiffusion experiment repeated-data --nelbo-samples 2 --workers 2 \
    --output-dir benchmarks/results/repeated_data
fi
