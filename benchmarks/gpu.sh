#!/usr/bin/env bash
# Both throughput benchmarks on a CUDA machine, in about 8 minutes; one JSON and one Markdown table.
#
#   bash benchmarks/gpu.sh                       # CUDA: DistilRoBERTa-size model, seq 512, batch 64, bf16
#   bash benchmarks/gpu.sh --device cpu          # the same pipeline, shortened, on the CPU (known to work)
#   bash benchmarks/gpu.sh --out DIR             # default benchmarks/results/gpu (cpu: .../gpu-cpu-check)
#
# Training: `textdiffusion train`'s Trainer vs Trainer + DataCollatorForLanguageModeling, interleaved,
# eager and torch.compile. Generation: our sampler (eager, compiled with CUDA graphs, and with the prefix/dual
# key-value cache) vs the original per-position loop and an AR model of the same size with KV-cached generate,
# batch 1 and 16.
set -euo pipefail
DEVICE=cuda
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown argument '$1' (use --device cuda|cpu, --out DIR)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DEVICE" = cuda ]; then
  OUT="${OUT:-benchmarks/results/gpu}"
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA device; run with --device cpu')"
  "$PY" benchmarks/train_throughput.py --device cuda --preset distil --precisions bf16 --batch-size 64 --max-length 512 \
      --rounds 3 --steps-per-round 20 --out "$OUT/train-eager"
  "$PY" benchmarks/train_throughput.py --device cuda --preset distil --precisions bf16 --batch-size 64 --max-length 512 \
      --rounds 3 --steps-per-round 20 --compile --out "$OUT/train-compiled"
  # the curated grid: cache none/prefix/dual x confidence/threshold/eb (cached rows eager, uncached also compiled)
  "$PY" benchmarks/generation_speed.py --device cuda --preset distil --vocab-size 32768 --max-length 128 \
      --dtypes bfloat16 --compile --grid default --block-length 32 --batch-sizes 1 16 --repeats 3 --scorer none \
      --out "$OUT/generation"
else
  OUT="${OUT:-benchmarks/results/gpu-cpu-check}"
  "$PY" benchmarks/train_throughput.py --device cpu --preset micro --precisions fp32 --batch-size 8 --max-length 64 \
      --rounds 2 --steps-per-round 4 --out "$OUT/train-eager"
  "$PY" benchmarks/generation_speed.py --device cpu --quick --out "$OUT/generation"
fi
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))}
(out / "summary.json").write_text(json.dumps(parts, indent=2) + "\n")
md = ["# benchmarks/gpu.sh", ""]
for name, part in parts.items():
    md += [f"## {name}", "", (out / name / "README.md").read_text(), ""]
(out / "summary.md").write_text("\n".join(md))
print(f"gpu.sh: wrote {out}/summary.json and {out}/summary.md")
PYEOF
