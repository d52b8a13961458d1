#!/usr/bin/env bash
# Every `textdiffusion experiment` on the bundled wiki-small model, results into benchmarks/results/experiments/.
#
#   make scorer                                   # once: the offline SmolLM2 scorer for gen PPL
#   bash benchmarks/experiments.sh [AR_CHECKPOINT]  # default runs/wiki-small-ar (see benchmarks/ar_vs_diffusion.py)
set -euo pipefail
cd "$(dirname "$0")/.."
TD="${TEXTDIFFUSION:-$( [ -x .venv/bin/textdiffusion ] && echo .venv/bin/textdiffusion || echo textdiffusion )}"
AR="${1:-runs/wiki-small-ar}"
OUT=benchmarks/results/experiments
export HF_HUB_OFFLINE=1
COMMON=(--checkpoint wiki-small --num-prompts 32 --prompt-tokens 8 --new-tokens 48 --steps 16 --overwrite)
"$TD" experiment masking-viz --checkpoint wiki-small --output-dir "$OUT/masking-viz" --overwrite
"$TD" experiment levels --checkpoint wiki-small --output-dir "$OUT/levels" --overwrite
for name in schedules sampling temperature; do
  "$TD" experiment "$name" "${COMMON[@]}" --output-dir "$OUT/$name"
done
"$TD" experiment steps "${COMMON[@]}" --ar-checkpoint "$AR" --output-dir "$OUT/steps"
