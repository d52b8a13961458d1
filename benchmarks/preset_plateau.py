"""Does a from-scratch preset escape the unigram plateau? Three architectures of the same size.

    python benchmarks/preset_plateau.py --steps 1500 --out benchmarks/results/preset_plateau

Trains `--preset tiny` as `--architecture modernbert` (ours: local-first attention),
`modernbert-stock` (ModernBERT's own layout) and `roberta` (post-LN) through the normal
`textdiffusion train` command on the bundled wiki-vital corpus (same data, tokenizer, seed, steps,
batch, learning rate), then writes a Markdown table of the final validation loss at each mask level
next to the unigram baselines. This is the evidence behind the presets' design.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def final_levels(run: Path) -> dict[float, float]:
    rows = list(csv.DictReader((run / "per_level_loss.csv").open()))
    last = max(int(r["step"]) for r in rows)
    return {float(r["mask_rate"]): float(r["loss"]) for r in rows if int(r["step"]) == last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", default="benchmarks/results/preset_plateau")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for textdiffusion train")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="preset_plateau_"))  # models and logs stay out of the repository
    results, seconds = {}, {}
    archs = ("modernbert", "modernbert-stock", "roberta")
    for arch in archs:
        run = runs / arch
        cmd = [sys.executable, "-m", "textdiffusion", "train", "--preset", a.preset, "--architecture", arch,
               "--max-steps", str(a.steps), "--eval-steps", str(a.steps), "--eval-blocks", "128",
               "--precision", "fp32",  # as recorded (before --precision auto chose bf16 on AMX CPUs)
               "--output-dir", str(run), "--overwrite", *a.extra]
        t0 = time.perf_counter()
        with (runs / f"{arch}.log").open("w") as log:  # the run's own output, progress bars included
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        seconds[arch] = time.perf_counter() - t0
        results[arch] = final_levels(run)
    refs = json.loads((runs / "modernbert" / "references.json").read_text())
    lines = [f"# Preset plateau check: `--preset {a.preset}`, {a.steps} steps, wiki-vital",
             "", f"Command: `python benchmarks/preset_plateau.py --steps {a.steps}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores, "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| mask rate | " + " | ".join(archs) + " |", "| --- " * (len(archs) + 1) + "|"]
    for rate in sorted(results["modernbert"]):
        lines.append(f"| {rate:.1f} | " + " | ".join(f"{results[a][rate]:.3f}" for a in archs) + " |")
    for name, value in refs.items():
        lines.append(f"| {name} | " + " | ".join(f"{value:.3f}" for _ in archs) + " |")
    lines.append("| training time (s) | " + " | ".join(f"{seconds[a]:.0f}" for a in archs) + " |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"final_loss": {a: {str(k): v for k, v in r.items()} for a, r in results.items()},
                                                  "references": refs, "seconds": seconds}, indent=2) + "\n")
    print("\n".join(lines))
    print(f"runs and logs: {runs}")


if __name__ == "__main__":
    main()
