"""The diffusion model against its autoregressive baseline: validation curves and best checkpoints.

    textdiffusion train --config recipes/wiki-small.yaml                                   # -> runs/wiki-small
    textdiffusion train --config recipes/wiki-small.yaml --objective ar --max-steps 4000 \\
        --eval-steps 500 --output-dir runs/wiki-small-ar                                  # same size, tokens, Trainer
    python benchmarks/ar_vs_diffusion.py --diffusion runs/wiki-small --ar runs/wiki-small-ar

Both runs log their validation NLL against tokens seen in ``validation_curve.csv`` (the diffusion model
its NELBO bound, the AR model its exact NLL, on the same validation tokens), and both keep their
validation-best checkpoint as the final model. This script draws the two curves and evaluates both
final models with `textdiffusion eval` on the same blocks, so the comparison is best point to best
point: on a small corpus an AR model starts to overfit within a few epochs.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import torch

from textdiffusion.pipelines.evaluate import EvalArgs, run_eval


def read_curve(run: Path) -> list[dict]:
    path = run / "validation_curve.csv"
    if not path.exists():
        sys.exit(f"error: {run} has no validation_curve.csv: pass the output dir of a `textdiffusion train` run.")
    with path.open() as f:
        return [{k: (float(v) if k != "kind" else v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusion", required=True)
    ap.add_argument("--ar", required=True)
    ap.add_argument("--dataset", default="wiki-vital")
    ap.add_argument("--eval-blocks", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/ar_vs_diffusion")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    curves = {"diffusion (NELBO bound)": read_curve(Path(args.diffusion)), "autoregressive (exact NLL)": read_curve(Path(args.ar))}
    finals = {}
    for name, ckpt in (("diffusion", args.diffusion), ("ar", args.ar)):
        finals[name] = run_eval(EvalArgs(checkpoint=ckpt, dataset=args.dataset, eval_blocks=args.eval_blocks,
                                         samples_per_block=8, device="cpu"))
    diff = finals["diffusion"]["nelbo"][0]
    ar = finals["ar"]["nll"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in curves.items():
        rows = [r for r in rows if r["tokens_seen"] > 0]
        ax.plot([r["tokens_seen"] / 1e6 for r in rows], [r["nll"] for r in rows], marker="o", label=name)
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("validation nats per token")
    ax.set_title("Validation NLL (bound) vs tokens seen, same tokens and size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    def best(rows):
        return min((r for r in rows if r["tokens_seen"] > 0), key=lambda r: r["nll"])

    lines = [f"Command: `python {' '.join(sys.argv)}`  ",
             f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}", "",
             "Validation curves (training-time evaluation):", "",
             "| model | evaluations | best step | tokens seen at best | best validation nats/token | perplexity (bound) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rows in curves.items():
        b = best(rows)
        lines.append(f"| {name} | {len(rows)} | {int(b['step'])} | {b['tokens_seen'] / 1e6:.1f}M | {b['nll']:.3f} | "
                     f"{b['perplexity']:.1f} |")
    lines += ["", f"Final (validation-best) models, `textdiffusion eval` on the same {finals['ar']['blocks']} "
              f"`{args.dataset}` validation blocks and the same {ar['tokens']:,} scored tokens:", "",
              "| model | nats/token | bits/token | perplexity |", "| --- | --- | --- | --- |",
              f"| diffusion, NELBO (upper bound), {diff['estimator']} | {diff['nats_per_token']:.3f} ± {diff['stderr']:.3f} | "
              f"{diff['bits_per_token']:.3f} | ≤ {diff['perplexity_bound']:.1f} |",
              f"| autoregressive, exact NLL | {ar['nats_per_token']:.3f} ± {ar['stderr']:.3f} | {ar['bits_per_token']:.3f} | "
              f"{ar['perplexity']:.1f} |", "", "![curves](curves.png)"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"curves": curves, "final": finals}, indent=2, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
