#!/usr/bin/env bash
# Generative classification from the bundled pretrained models (issue 22, part 4): `textdiffusion experiment
# classify --start-from wiki-small --ar-start-from wiki-small-ar`, results into benchmarks/results/classify-pretrained/.
# wiki-vital `topic` without its catch-all "Uncategorized" (11 topics, 8,584 training / 449 validation documents),
# with 100 %, 10 % and 3 % of the training labels. Per share, 4 models of 220 steps of 32 × 128 tokens: the diffusion
# model fine-tuned from wiki-small, the AR model from wiki-small-ar, wiki-small's encoder + a new head, and the same
# architecture from scratch; every one reads only the labelled share (the generative fine-tunes: --unlabelled drop,
# since their starts already read all of wiki-vital), so the objectives differ, not the data; plus the
# class-conditional token counts. Every validation text is scored (449; the
# diffusion NELBO from 2 mask draws shared by the 11 topics). No guidance part (a separate benchmark does it).
#
#   bash benchmarks/classify_pretrained.sh [CORE] [FLAGS...]   # default core 0; one thread; FLAGS override, e.g.
#   bash benchmarks/classify_pretrained.sh 1 --nelbo-samples 16  # more mask draws (the committed run used 2)
#   OUT=benchmarks/results/classify-pretrained-16-draws bash benchmarks/classify_pretrained.sh 1 \
#     --classifiers diffusion --label-fractions 0.1 0.03 --nelbo-samples 16   # rerun one classifier elsewhere
#   OUT=benchmarks/results/classify-pretrained-label-slot bash benchmarks/classify_pretrained.sh 1 \
#     --classifiers label-slot                # the label as a target too, read in one pass (~6 min a share)
#     (--label-target 1 --label-target-weight 50 by default: every labelled row predicts its label)
#
# About 95 minutes on one core, from CPU seconds measured on an AMD EPYC core (fp32, 2026-12-01, a few steps each):
#   per step at batch 32 × 128 tokens: diffusion fine-tune 1.07 (1.3 in wiki-small's own recipe runs: 1.3 used),
#     AR fine-tune 1.83, discriminative 1.45 (pretrained or from scratch alike);
#   per training run: ~20 s (diffusion) / ~7 s (AR) of loading, tokenizing and the two validation passes;
#   classifying one text under 11 topics: 0.31 s per NELBO mask draw, 0.54 s for the AR's exact NLL.
#   Per share: 27 + 220 × (1.3 + 1.83 + 2 × 1.45) ≈ 1,350 s of training + 449 × (2 × 0.31 + 0.54) ≈ 520 s of
#   classifying ≈ 31 minutes; three shares ≈ 94 minutes, plus a minute of loading. Each further 10 steps add ~3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
TD="${TEXTDIFFUSION:-$( [ -x .venv/bin/textdiffusion ] && echo .venv/bin/textdiffusion || echo textdiffusion )}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results/classify-pretrained}
# the experiment replaces the folder; keep its hand-written reading (README.md) — update it if the numbers move
KEEP=$(mktemp); [ -f "$OUT/README.md" ] && cp "$OUT/README.md" "$KEEP"
trap '[ -s "$KEEP" ] && [ -d "$OUT" ] && cp "$KEEP" "$OUT/README.md"; rm -f "$KEEP"' EXIT
taskset -c "${1:-0}" "$TD" experiment classify --output-dir "$OUT" --overwrite \
  --start-from wiki-small --ar-start-from wiki-small-ar --datasets wiki-vital:topic --exclude-labels Uncategorized \
  --label-fractions 1 0.1 0.03 --train-steps 220 --batch-size 32 --max-length 128 --learning-rate 1e-3 \
  --eval-texts 449 --nelbo-samples 2 --cfg-scales "${@:2}"
