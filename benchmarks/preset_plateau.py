"""Does a from-scratch preset escape the unigram plateau? ModernBERT vs post-LN RoBERTa, same size.

    python benchmarks/preset_plateau.py --steps 1000 --out benchmarks/results/preset_plateau

Trains `--preset tiny` with `--architecture modernbert` and `--architecture roberta` through the normal
`textdiffusion train` command on the bundled wiki-vital corpus (same data, seed, steps, batch), then
writes a Markdown table of the final validation loss at each mask level next to the unigram baselines.
This is the evidence behind the choice of ModernBERT for the presets.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def final_levels(run: Path) -> dict[float, float]:
    rows = list(csv.DictReader((run / "per_level_loss.csv").open()))
    last = max(int(r["step"]) for r in rows)
    return {float(r["mask_rate"]): float(r["loss"]) for r in rows if int(r["step"]) == last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", default="benchmarks/results/preset_plateau")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for textdiffusion train")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    for arch in ("modernbert", "roberta"):
        run = out / arch
        cmd = [sys.executable, "-m", "textdiffusion", "train", "--preset", a.preset, "--architecture", arch,
               "--max-steps", str(a.steps), "--eval-steps", str(a.steps), "--eval-blocks", "128",
               "--output-dir", str(run), "--overwrite", *a.extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds[arch] = time.perf_counter() - t0
        results[arch] = final_levels(run)
    refs = json.loads((out / "modernbert" / "references.json").read_text())
    lines = [f"# Preset plateau check: `--preset {a.preset}`, {a.steps} steps, wiki-vital",
             "", f"Command: `python benchmarks/preset_plateau.py --steps {a.steps}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores, "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| mask rate | ModernBERT (pre-LN) | RoBERTa (post-LN) |", "| --- | --- | --- |"]
    for rate in sorted(results["modernbert"]):
        lines.append(f"| {rate:.1f} | {results['modernbert'][rate]:.3f} | {results['roberta'][rate]:.3f} |")
    for name, value in refs.items():
        lines.append(f"| {name} | {value:.3f} | {value:.3f} |")
    lines.append(f"| training time (s) | {seconds['modernbert']:.0f} | {seconds['roberta']:.0f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
