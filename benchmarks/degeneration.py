"""Degeneration: how repetitive are samples under each decoding setting, next to real text?

    python benchmarks/degeneration.py --checkpoint wiki-small --out benchmarks/results/degeneration

Prompts are the first --prompt-tokens tokens of validation documents of --dataset (the same split as
training); each setting continues them by --new-tokens tokens in --steps steps. Reported per setting:
distinct-1/2/3 over all samples, the within-sample bigram repetition rate, the token entropy, and model
calls; the first row is the real continuations of the same prompts. Small models collapse into loops
under confidence ordering ("music, music, music"); this table is how the defaults were chosen. For
fluency (gen PPL under a scorer LM) beside these numbers, see `textdiffusion experiment`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from textdiffusion.core.data import load_corpus
from textdiffusion.core.metrics import diversity
from textdiffusion.errors import UsageError
from textdiffusion.models.quality import diffusion_continuations, prompts_from_documents
from textdiffusion.pipelines.generation import DiffusionGenerator

# Every row spells out order temperature and repetition penalty, so that it does not change when the
# defaults of `textdiffusion generate` (the row with an empty dict) do.
SETTINGS = {
    "confidence, top-k 50 (no remedy)": dict(strategy="confidence", order_temperature=0.0, repetition_penalty=1.0),
    "confidence, greedy": dict(strategy="confidence", sampling="greedy", order_temperature=0.0, repetition_penalty=1.0),
    "confidence + order temperature 1": dict(strategy="confidence", order_temperature=1.0, repetition_penalty=1.0),
    "confidence + repetition penalty 1.3": dict(strategy="confidence", order_temperature=0.0, repetition_penalty=1.3),
    "confidence + remasking 0.5": dict(strategy="confidence", remask_fraction=0.5, order_temperature=0.0,
                                       repetition_penalty=1.0),
    "confidence + blocks of 16": dict(strategy="confidence", block_length=16, order_temperature=0.0, repetition_penalty=1.0),
    "confidence + order temperature 2": dict(strategy="confidence", order_temperature=2.0, repetition_penalty=1.0),
    "confidence + order temperature 1 + repetition penalty 1.3": dict(strategy="confidence", order_temperature=1.0,
                                                                     repetition_penalty=1.3),
    "confidence + order temperature 2 + repetition penalty 1.3": dict(strategy="confidence", order_temperature=2.0,
                                                                     repetition_penalty=1.3),
    "the defaults of `textdiffusion generate`": dict(),
    "random order": dict(strategy="random", order_temperature=0.0, repetition_penalty=1.0),
    "remask-random (original)": dict(strategy="remask-random", order_temperature=0.0, repetition_penalty=1.0),
    "confidence threshold 0.9": dict(strategy="confidence", confidence_threshold=0.9, order_temperature=0.0,
                                     repetition_penalty=1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", default="wiki-vital")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/degeneration")
    args = ap.parse_args()

    gen = DiffusionGenerator.from_pretrained(args.checkpoint, device="cpu")
    tok = gen.tokenizer
    try:
        prompts = prompts_from_documents(load_corpus(args.dataset).validation, tok, args.num_prompts,
                                         args.prompt_tokens, args.new_tokens, args.dataset)
    except UsageError as e:
        sys.exit(f"error: {e}")
    rows = [{"setting": "real text (reference)", "nfe": "", **diversity(prompts.references)}]
    examples = {}
    for name, settings in SETTINGS.items():
        out = diffusion_continuations(gen, prompts, args.new_tokens, seed=0, steps=args.steps, **settings)
        rows.append({"setting": name, "nfe": out.nfe, **diversity(out.new_ids)})
        examples[name] = out.texts[0]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d"), "checkpoint": args.checkpoint, "steps": args.steps}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "examples": examples}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, {meta['date']}; "
             f"{args.num_prompts} prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.steps} steps", "",
             "| setting | model calls | distinct-1 | distinct-2 | distinct-3 | repetition-2 | entropy (bits) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['nfe']} | {r['distinct-1']:.3f} | {r['distinct-2']:.3f} | {r['distinct-3']:.3f} | "
                     f"{r['repetition-2']:.3f} | {r['entropy-bits']:.2f} |")
    lines += ["", "First sample of each setting:", ""] + [f"- **{k}**: {v}" for k, v in examples.items()]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
