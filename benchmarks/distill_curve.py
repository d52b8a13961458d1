"""How a distillation round's quality moves with its length: the judged student of every checkpoint of a
`textdiffusion distill` run, sampled at the round's new step count and scored as the quality gate scores it.

    python benchmarks/distill_curve.py --run runs/wiki-small-sdtt            # round 1: 32 -> 16 steps
    python benchmarks/distill_curve.py --run runs/wiki-small-sdtt --scorer none   # distinct-2 only (no scorer)

Step 0 is the teacher itself at the new step count (what halving the steps alone gives); each ``checkpoint-N``
contributes its moving average of the student's weights (``ema.safetensors``, or the raw student without one),
loaded into the teacher's architecture. The gate's own prompts and layout: the first ``--prompts`` validation
documents of the run's dataset, the teacher's prefix length as the prompt, continuations up to its training
length, seed 0 — so a row at the round's last step is the number the gate judged. Only the checkpoints of
round 1 are read (later rounds learn other step counts from other teachers). Writes README.md, results.json and
curve.png in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_model  # noqa: E402

from textdiffusion.config import DiffusionConfig  # noqa: E402
from textdiffusion.core.data import load_corpus  # noqa: E402
from textdiffusion.models.bundled import resolve_checkpoint  # noqa: E402
from textdiffusion.models.loading import load_diffusion_model  # noqa: E402
from textdiffusion.models.quality import Scorer, prompts_from_documents  # noqa: E402
from textdiffusion.pipelines.distillation import EMA_WEIGHTS, STATE_NAME, Layout, QualityGate, RoundState  # noqa: E402


def round_one_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoints trained in round 1, in step order."""
    found = []
    for folder in run.glob("checkpoint-*"):
        if not (folder / STATE_NAME).exists():
            continue
        state = RoundState.load(folder)
        step = int(folder.name.split("-")[1])
        ended_round_one = bool(state.history) and state.history[0]["step"] == step
        if state.index == 1 or ended_round_one:
            found.append((step, folder))
    return sorted(found)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="The output dir of `textdiffusion distill` (its checkpoint-N folders).")
    ap.add_argument("--prompts", type=int, default=64, help="Validation prompts, as the gate's --gate-prompts.")
    ap.add_argument("--scorer", default="smollm2", help="gen-PPL scorer (smollm2, gemma3, a causal LM; 'none' to skip).")
    ap.add_argument("--out", default="benchmarks/results/distill_curve")
    args = ap.parse_args(argv)
    run = Path(args.run)
    run_args = json.loads((run / "run_args.json").read_text()) if (run / "run_args.json").exists() else None
    if run_args is None or "steps_per_round" not in run_args:
        sys.exit(f"distill_curve.py: --run {args.run!r} is not the output dir of `textdiffusion distill`.")
    checkpoints = round_one_checkpoints(run)
    if not checkpoints:
        sys.exit(f"distill_curve.py: --run {args.run!r} has no checkpoint of round 1.")

    teacher_path = resolve_checkpoint(run_args["teacher"], "--teacher")
    config = DiffusionConfig.from_pretrained(teacher_path)
    tokenizer, model = load_diffusion_model(teacher_path, config, flag="--teacher")
    saved = DiffusionConfig.from_pretrained(checkpoints[0][1])  # the checkpoint's config: the distilled settings
    sampler_config, steps = saved.generation, saved.generation.steps
    layout = Layout.of(config, sampler_config, run_args.get("max_length"))
    prompt_tokens, new_tokens = layout.prompt_tokens, layout.new_tokens  # the gate's prompts (distill_run.quality_gate)
    docs = load_corpus(run_args["dataset"], run_args.get("text_column", "text"),
                       run_args.get("validation_fraction", 0.05)).validation
    prompts = prompts_from_documents(docs, tokenizer, args.prompts, prompt_tokens, new_tokens, run_args["dataset"])
    scorer = Scorer.load(args.scorer) if args.scorer != "none" else None
    gate = QualityGate(tokenizer, config, sampler_config, prompts, new_tokens, scorer, 0.0, "cpu")

    rows = []
    for step, folder in [(0, None)] + checkpoints:
        if folder is not None:
            weights = folder / EMA_WEIGHTS if (folder / EMA_WEIGHTS).exists() else folder / "model.safetensors"
            load_model(model, str(weights))
        quality = gate.measure(model, steps)
        rows.append({"distill_step": step, "steps": steps, "gen_ppl": quality["gen_ppl"],
                     "distinct-2": quality["distinct-2"], "entropy-bits": quality["entropy-bits"],
                     "example": quality["example"][:200]})
        print(json.dumps(rows[-1]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {len(os.sched_getaffinity(0))} available to the run, "
               f"no GPU")
    (out / "results.json").write_text(json.dumps({"machine": machine, "args": vars(args), "run_args": run_args,
                                                  "rows": rows}, indent=2) + "\n")
    lines = ["# Quality of a distillation round against its length", "",
             f"`python benchmarks/distill_curve.py {' '.join(argv if argv is not None else sys.argv[1:])}` on {machine}. "
             f"Teacher {run_args['teacher']}, {run_args['divergence']}, lr {run_args['learning_rate']}, batch "
             f"{run_args['per_device_train_batch_size']}, EMA {run_args['ema']}; each row samples the judged student at "
             f"{steps} steps on the gate's {args.prompts} prompts ({prompt_tokens} prompt tokens, {new_tokens} new, seed 0). "
             "Step 0 is the undistilled teacher at that step count.", "",
             "| distillation steps | gen PPL | distinct-2 | entropy (bits) |", "|---:|---:|---:|---:|"]
    for r in rows:
        ppl = "n/a" if math.isnan(r["gen_ppl"]) else f"{r['gen_ppl']:.1f}"
        lines.append(f"| {r['distill_step']} | {ppl} | {r['distinct-2']:.3f} | {r['entropy-bits']:.2f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "curve.png", steps)
    print("\n".join(lines))


def plot(rows: list[dict], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(6, 3.6))
    x = [r["distill_step"] for r in rows]
    left.plot(x, [r["gen_ppl"] for r in rows], marker="o", color="tab:blue")
    left.set_xlabel("distillation steps (optimiser steps of round 1)")
    left.set_ylabel(f"gen PPL at {steps} steps", color="tab:blue")
    right = left.twinx()
    right.plot(x, [r["distinct-2"] for r in rows], marker="s", color="tab:orange")
    right.set_ylabel("distinct-2", color="tab:orange")
    left.set_title("One SDTT round: quality of the student as it trains")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
