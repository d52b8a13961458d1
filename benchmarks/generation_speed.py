"""Generation speed: the vectorised sampler against the original one-sample, per-position loop.

    python benchmarks/generation_speed.py                       # a preset-sized model, CPU
    python benchmarks/generation_speed.py --checkpoint runs/demo
    python benchmarks/generation_speed.py --quick               # seconds; what the test suite runs

Same model, same settings (remask-random, top-k 50, linear schedule, the same steps and length) for
both; tokens/s counts generated tokens. Batch sizes are measured side by side in one run and reported
as ratios against the original loop, which generates one sample at a time in float32. Our sampler is
also timed in bfloat16 (fast on CPUs with AMX); that row changes the arithmetic, not the algorithm.
Writes a JSON and a Markdown table to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from original_sampler import generate_original  # noqa: E402

from textdiffusion.generation import DiffusionGenerator  # noqa: E402


def load(args):
    if args.checkpoint:
        return DiffusionGenerator.from_pretrained(args.checkpoint, device="cpu")
    from textdiffusion.data import load_corpus
    from textdiffusion.modeling import build_preset_model, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(load_corpus("wiki-vital").train[:2000], args.vocab_size)
    torch.manual_seed(0)
    model = build_preset_model(args.preset, tokenizer, args.max_length)
    return DiffusionGenerator(model, tokenizer, {"max_length": args.max_length}, device="cpu")


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a model directory (default: a random preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, nargs="+", default=[10])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    help="dtypes for our sampler (the original loop always runs in float32, as it did)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    ap.add_argument("--out", default="benchmarks/results/generation_speed")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.vocab_size, args.max_length, args.batch_sizes, args.repeats = "micro", 512, 32, [1, 4], 1
        args.steps, args.dtypes = [4], ["float32"]
    torch.set_num_threads(torch.get_num_threads())
    gen = load(args)
    prompt = "The history of"
    n_prompt = len(gen.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    new_tokens = args.max_length - n_prompt - 2
    settings = dict(strategy="remask-random", sampling="topk", top_k=50, schedule="linear")
    rows = []
    for steps in args.steps:
        base_s = timed(lambda: generate_original(gen.model, gen.tokenizer, prompt, args.max_length, steps), args.repeats)
        base_tps = new_tokens / base_s
        rows.append({"sampler": "original loop (float32)", "steps": steps, "batch": 1, "seconds": base_s, "tokens_per_s": base_tps,
                     "nfe": steps, "speedup": 1.0})
        for dtype in args.dtypes:
            gen.model.to(getattr(torch, dtype))
            for b in args.batch_sizes:
                s = timed(lambda: gen.generate([prompt] * b, max_length=args.max_length, steps=steps, **settings), args.repeats)
                out = gen.generate([prompt] * b, max_length=args.max_length, steps=steps, **settings)
                tps = b * new_tokens / s
                rows.append({"sampler": f"textdiffusion ({dtype})", "steps": steps, "batch": b, "seconds": s,
                             "tokens_per_s": tps, "nfe": out.nfe, "speedup": tps / base_tps})
            gen.model.to(torch.float32)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": args.checkpoint or f"preset {args.preset} (random init)",
            "max_length": args.max_length, "new_tokens_per_sample": new_tokens}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['date']}  ",
             f"Model: {meta['model']}, {args.max_length} tokens per sample, {new_tokens} generated", "",
             "| sampler | steps | batch | model calls | tokens/s | vs original |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['batch']} | {r['nfe']} | {r['tokens_per_s']:.0f} | {r['speedup']:.1f}x |")
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
