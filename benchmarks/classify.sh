#!/usr/bin/env bash
# Generative classification (diffusion NELBO, AR likelihood) vs a discriminative baseline, and label-guided
# generation: `textdiffusion experiment classify`, results into benchmarks/results/classify/.
# Trains 12 micro models (about 14 CPU minutes in all (24 min wall on a shared core)); one thread, pinned to one core:
#
#   bash benchmarks/classify.sh [CORE]      # default core 0
set -euo pipefail
cd "$(dirname "$0")/.."
TD="${TEXTDIFFUSION:-$( [ -x .venv/bin/textdiffusion ] && echo .venv/bin/textdiffusion || echo textdiffusion )}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# the experiment replaces the folder; keep its hand-written reading (README.md) — update it if the numbers move
KEEP=$(mktemp); [ -f benchmarks/results/classify/README.md ] && cp benchmarks/results/classify/README.md "$KEEP"
trap '[ -s "$KEEP" ] && [ -d benchmarks/results/classify ] && cp "$KEEP" benchmarks/results/classify/README.md; rm -f "$KEEP"' EXIT
taskset -c "${1:-0}" "$TD" experiment classify --output-dir benchmarks/results/classify --overwrite \
  --preset micro --train-steps 1200 --batch-size 16 --max-length 64 --learning-rate 5e-3 --eval-texts 240 --nelbo-samples 8 \
  --cfg-scales 0 1 2 4 --guidance-samples 8 --new-tokens 48 --steps 16
