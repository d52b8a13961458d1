#!/usr/bin/env bash
# Tokenizer-independent comparison (nats per word, bits per byte) of the bundled wiki-small and mpnet-base as
# fetched (its MLM head built from the training split, before any training), on the same validation text.
#
#   OMP_NUM_THREADS=1 taskset -c 1 bash benchmarks/tokenizer_free_eval.sh [BLOCKS] [OUT]   # ~2 CPU-minutes for 16
set -euo pipefail
BLOCKS="${1:-16}"
OUT="${2:-benchmarks/results/tokenizer_free_eval}"
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
for model in wiki-small mpnet-base; do
  "$PY" -m textdiffusion eval --checkpoint "$model" --max-length 128 --eval-blocks "$BLOCKS" --samples-per-block 2 \
    --batch-size 8 --device cpu --output-dir "$OUT/$model" --overwrite 2>&1 | grep -v "Loading weights" \
    | grep -v "^\[transformers\]\|^Key \|^-\+\|MISSING\|UNEXPECTED\|^Notes\|^- \|^$" > "$OUT/$model.log"
done
"$PY" - "$OUT" "$BLOCKS" <<'PYEOF'
import json, platform, os, sys, time
from pathlib import Path
out, blocks = Path(sys.argv[1]), sys.argv[2]
md = ["# Tokenizer-independent numbers: wiki-small vs mpnet-base before training", "",
      f"Command: `OMP_NUM_THREADS=1 taskset -c 1 bash benchmarks/tokenizer_free_eval.sh {blocks}`  ",
      f"Machine: {platform.machine()}, {os.cpu_count()} cores, fp32, {time.strftime('%Y-%m-%d')}. "
      f"{blocks} validation blocks of 128 tokens of each model's own tokenizer (wiki-vital), exact-k NELBO, 2 samples per block.", "",
      "| model | nats/token | nats/word | bits/byte | tokens | words | bytes |", "| --- | --- | --- | --- | --- | --- | --- |"]
for model in ("wiki-small", "mpnet-base"):
    b = json.loads((out / model / "eval.json").read_text())["nelbo"][0]
    md.append(f"| {model} | {b['nats_per_token']:.3f} ± {b['stderr']:.3f} | {b['nats_per_word']:.3f} | {b['bits_per_byte']:.3f} | "
              f"{b['tokens']:,} | {b['words']:,} | {b['bytes']:,} |")
(out / "README.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PYEOF
