"""Degeneration: how repetitive are samples under each decoding setting, next to real text?

    python benchmarks/degeneration.py --checkpoint runs/demo --out benchmarks/results/degeneration

Prompts are the first --prompt-tokens tokens of validation documents of --dataset (the same split as
training); each setting continues them by --new-tokens tokens in --steps steps. Reported per setting:
distinct-1/2/3 over all samples, the within-sample bigram repetition rate, the token entropy, and model
calls; the first row is the real continuations of the same prompts. Small models collapse into loops
under confidence ordering ("music, music, music"); this table is how the defaults were chosen.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from textdiffusion.data import load_corpus
from textdiffusion.generation import DiffusionGenerator
from textdiffusion.metrics import diversity

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
    docs = load_corpus(args.dataset).validation
    encoded = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    encoded = [e for e in encoded if len(e) >= args.prompt_tokens + args.new_tokens][: args.num_prompts]
    if len(encoded) < args.num_prompts:
        sys.exit(f"error: --dataset {args.dataset!r} has only {len(encoded)} validation documents long enough for "
                 f"--num-prompts {args.num_prompts}.")
    prompts = [tok.decode(e[: args.prompt_tokens]) for e in encoded]
    real = [e[args.prompt_tokens: args.prompt_tokens + args.new_tokens] for e in encoded]
    rows = [{"setting": "real text (reference)", "nfe": "", **diversity(real)}]
    examples = {}
    for name, settings in SETTINGS.items():
        templates = [f"{p}<mask:{args.new_tokens}>" for p in prompts]
        out = gen.generate(templates=templates, steps=args.steps, seed=0, stop_at_eos=False, **settings)
        _, editable, _ = gen.build_batch(templates)
        generated = [row[ed].tolist() for row, ed in zip(out.token_ids, editable)]  # the new tokens only
        rows.append({"setting": name, "nfe": out.nfe, **diversity(generated)})
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
