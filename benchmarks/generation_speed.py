"""Generation speed: the vectorised sampler against the original one-sample, per-position loop and
against an autoregressive model of the same size with Transformers' KV-cached `generate`.

    python benchmarks/generation_speed.py                       # a preset-sized model, CPU
    python benchmarks/generation_speed.py --checkpoint wiki-small
    python benchmarks/generation_speed.py --device cuda --dtypes bfloat16 --compile   # the GPU path
    python benchmarks/generation_speed.py --quick               # seconds; what the test suite runs

Same model, same settings (remask-random, top-k 50, linear schedule, the same steps and length) for
the diffusion rows; tokens/s counts generated tokens; NFE is model calls per batch. The AR baseline is a
GPT-2 with the preset's width, depth and weights per layer (random init: speed does not depend on the
weights), generating the same number of tokens, one KV-cached call each. Everything is measured side by
side in one run and reported as ratios against the original loop (one sample at a time, float32).
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

from textdiffusion.config import DiffusionConfig  # noqa: E402
from textdiffusion.generation import DiffusionGenerator  # noqa: E402


def load(args):
    if args.checkpoint:
        return DiffusionGenerator.from_pretrained(args.checkpoint, device=args.device)
    from textdiffusion.data import load_corpus
    from textdiffusion.modeling import build_preset_model, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(load_corpus("wiki-vital").train[:2000], args.vocab_size)
    torch.manual_seed(0)
    model = build_preset_model(args.preset, tokenizer, args.max_length)
    return DiffusionGenerator(model, tokenizer, DiffusionConfig(max_length=args.max_length), device=args.device)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, a compiled graph
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def ar_baseline(args, tokenizer, dtype):
    from textdiffusion.autoregressive import CausalGenerator, build_ar_model

    preset = args.preset if not args.checkpoint else "tiny"
    torch.manual_seed(0)
    model = build_ar_model(preset, tokenizer, args.max_length).to(dtype)
    return CausalGenerator(model, tokenizer, torch.device(args.device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a model directory (default: a random preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    help="dtypes for our sampler (the original loop always runs in float32, as it did)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="also time our sampler with torch.compile (CUDA graphs on GPU)")
    ap.add_argument("--no-original", action="store_true", help="skip the original loop (slow at many steps)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    ap.add_argument("--out", default="benchmarks/results/generation_speed")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.vocab_size, args.max_length, args.batch_sizes, args.repeats = "micro", 512, 32, [1, 4], 1
        args.steps, args.dtypes = [4], ["float32"] if args.device == "cpu" else args.dtypes
    torch.set_num_threads(torch.get_num_threads())
    gen = load(args)
    prompt = "The history of"
    n_prompt = len(gen.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    new_tokens = args.max_length - n_prompt - 2
    settings = dict(strategy="remask-random", sampling="topk", top_k=50, schedule="linear")
    rows = []
    variants = [(d, False) for d in args.dtypes] + ([(d, True) for d in args.dtypes] if args.compile else [])
    compiled_gen = None
    for steps in args.steps:
        base_tps = float("nan")
        if not args.no_original:
            gen.model.to(torch.float32)
            base_s = timed(lambda: generate_original(gen.model, gen.tokenizer, prompt, args.max_length, steps), args.repeats)
            base_tps = new_tokens / base_s
            rows.append({"sampler": "original loop (float32)", "steps": steps, "batch": 1, "seconds": base_s,
                         "tokens_per_s": base_tps, "nfe": steps, "speedup": 1.0})
        for dtype, use_compile in variants:
            gen.model.to(getattr(torch, dtype))
            g = gen
            if use_compile:
                compiled_gen = compiled_gen or DiffusionGenerator(gen.model, gen.tokenizer, gen.config, device=args.device,
                                                                  compile=True)
                g = compiled_gen
            for b in args.batch_sizes:
                s = timed(lambda: g.generate([prompt] * b, max_length=args.max_length, steps=steps, **settings), args.repeats)
                out = g.generate([prompt] * b, max_length=args.max_length, steps=steps, **settings)
                tps = b * new_tokens / s
                name = f"textdiffusion ({dtype}{', compiled' if use_compile else ''})"
                rows.append({"sampler": name, "steps": steps, "batch": b, "seconds": s, "tokens_per_s": tps,
                             "nfe": out.nfe, "speedup": tps / base_tps})
    for dtype in args.dtypes:  # the AR baseline: NFE = new tokens, whatever the steps
        ar = ar_baseline(args, gen.tokenizer, getattr(torch, dtype))
        base = next((r["tokens_per_s"] for r in rows if r["sampler"].startswith("original")), float("nan"))
        for b in args.batch_sizes:
            s = timed(lambda: ar.generate_ids([prompt] * b, new_tokens, min_new_tokens=new_tokens), args.repeats)
            tps = b * new_tokens / s
            rows.append({"sampler": f"AR baseline, KV cache ({dtype})", "steps": "", "batch": b, "seconds": s,
                         "tokens_per_s": tps, "nfe": new_tokens, "speedup": tps / base})
    gen.model.to(torch.float32)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    meta = {"command": "python " + " ".join(sys.argv), "machine": machine,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": args.checkpoint or f"preset {args.preset} (random init)",
            "max_length": args.max_length, "new_tokens_per_sample": new_tokens}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['date']}  ",
             f"Model: {meta['model']}, {args.max_length} tokens per sample, {new_tokens} generated", "",
             "| sampler | steps | batch | model calls | tokens/s | vs original |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['batch']} | {r['nfe']} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x |")
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
