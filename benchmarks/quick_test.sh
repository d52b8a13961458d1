#!/usr/bin/env bash
# The per-mask-level table quoted in the README: `textdiffusion train --quick-test --preset tiny` on the
# bundled wiki-vital corpus, timed, with its output kept in benchmarks/results/quick_test/.
#   bash benchmarks/quick_test.sh [output-dir]
# fp32 is pinned: the recorded table was measured in fp32, before `--precision auto` chose bf16 on AMX CPUs.
set -euo pipefail
out=${1:-benchmarks/results/quick_test}
run=$(mktemp -d)/run
mkdir -p "$out"
start=$(date +%s)
HF_HUB_OFFLINE=1 textdiffusion train --quick-test --preset tiny --precision fp32 --output-dir "$run" 2>&1 | tr "\r" "\n" | grep -v -e "it/s\]" -e "s/it\]" -e "Writing model shards" | tee "$out/log.txt"
end=$(date +%s)
cp "$run/per_level_loss.csv" "$run/per_level_loss.png" "$run/references.json" "$out/"
{
  echo "Command: \`bash benchmarks/quick_test.sh\` (= \`textdiffusion train --quick-test --preset tiny --precision fp32\`)  "
  echo "Machine: $(uname -m), $(nproc) CPU cores, $(date +%Y-%m-%d); wall time $((end - start)) s  "
  echo
  echo '```'
  grep -B1 -A13 "validation loss at each mask level, step 1500" "$out/log.txt" | tail -14
  grep "every mask level" "$out/log.txt"
  echo '```'
} > "$out/README.md"
echo "model left in $run"
