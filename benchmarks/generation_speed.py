"""Generation speed at measured quality: our sampler (cache mode x strategy x steps/gamma) against the
original one-sample, per-position loop and an autoregressive model of the same size with its KV cache.

    python benchmarks/generation_speed.py --checkpoint wiki-small            # the table that sets the defaults
    python benchmarks/generation_speed.py --checkpoint wiki-small --ar-checkpoint runs/wiki-small-ar
    python benchmarks/generation_speed.py --device cuda --preset distil --vocab-size 32768 --dtypes bfloat16 --compile
    python benchmarks/generation_speed.py --quick                            # seconds; what the test suite runs

Every row continues the same prompts (the first --prompt-tokens tokens of validation documents) to
--max-length tokens, in one run, at one precision. Speed: tokens/s at batch 1 (the first prompt) and at
batch 16 (all prompts), best of --repeats after a warm-up; model calls (NFE) per batch. Quality, from the
batch-16 samples (a sample does not depend on its batch): gen PPL under the scorer (SmolLM2-135M, `make
scorer`), distinct-2 and within-sample repetition. The AR baseline is a GPT-2 of the diffusion model's
width, depth and weights per layer, with Transformers' KV-cached `generate`; its quality is measured only
when --ar-checkpoint gives a trained one (a random one is timed only: speed does not depend on the weights).
Writes results.json, README.md (the table) and frontier.png (tokens/s against gen PPL) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from original_sampler import generate_original  # noqa: E402

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.metrics import diversity
from textdiffusion.models.quality import PromptSet, diffusion_continuations, prompts_from_documents
from textdiffusion.pipelines.generation import DiffusionGenerator


def load(args):
    if args.checkpoint:
        return DiffusionGenerator.from_pretrained(args.checkpoint, device=args.device)
    from textdiffusion.core.data import load_corpus
    from textdiffusion.models.presets import build_preset_model, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(load_corpus("wiki-vital").train[:2000], args.vocab_size)
    torch.manual_seed(0)
    model = build_preset_model(args.preset, tokenizer, args.max_length)
    return DiffusionGenerator(model, tokenizer, DiffusionConfig(max_length=args.max_length), device=args.device)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, a compiled graph
    return best_of(fn, repeats)


def best_of(fn, repeats: int) -> float:
    """Seconds of the fastest run. On the CPU with one thread it is this process's CPU time: on a core that
    other jobs share, wall-clock time would also count their turns. With more threads it is wall-clock time
    (CPU time would add the threads up), which is fair only on an otherwise idle machine."""
    clock = time.perf_counter if torch.cuda.is_available() or torch.get_num_threads() > 1 else time.process_time
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
    return best


def fastest(fn, repeats: int, threads: list[int]) -> tuple[float, int]:
    """(seconds, thread count) of the fastest run over the thread counts: each side at its best."""
    results = []
    for n in threads:
        torch.set_num_threads(n)
        results.append((timed(fn, repeats), n))
    torch.set_num_threads(threads[0])
    return min(results)


def ar_baseline(args, tokenizer, dtype):
    from textdiffusion.models.autoregressive import CausalGenerator, build_ar_model

    if args.ar_checkpoint:
        return CausalGenerator.from_pretrained(args.ar_checkpoint, torch.device(args.device), dtype)
    preset = args.preset if not args.checkpoint else "tiny"
    torch.manual_seed(0)
    model = build_ar_model(preset, tokenizer, args.max_length).to(dtype)
    return CausalGenerator(model, tokenizer, torch.device(args.device))


# The curated grid (--grid default): every cache mode with every strategy, more points where the frontier is;
# rows with the sampler's default repetition penalty (1.3, set against loops in small models) and with 1.1
CURATED = [("none", "confidence", 16, 1.3), ("none", "confidence", 32, 1.3), ("none", "eb", 16.0, 1.3),
           ("prefix", "confidence", 32, 1.3), ("prefix", "eb", 16.0, 1.3),
           ("dual", "confidence", 16, 1.3), ("dual", "confidence", 32, 1.3), ("dual", "confidence", 64, 1.3),
           ("dual", "threshold", 0.3, 1.3), ("dual", "eb", 16.0, 1.3), ("dual", "eb", 32.0, 1.3),
           ("none", "confidence", 32, 1.1), ("prefix", "confidence", 32, 1.1),
           ("dual", "confidence", 16, 1.1), ("dual", "confidence", 24, 1.1), ("dual", "confidence", 32, 1.1),
           ("dual", "confidence", 48, 1.1), ("dual", "eb", 16.0, 1.1), ("dual", "confidence", 32, 1.0)]


def settings_grid(args) -> list[tuple[str, dict]]:
    """(name, generate kwargs) for every diffusion row: cache mode x strategy x steps / threshold / gamma."""
    base = dict(block_length=args.block_length)
    if args.grid == "default":
        knob = {"confidence": lambda v: (f"{v} steps", dict(steps=v)),
                "threshold": lambda v: (f"p >= {v}", dict(confidence_threshold=v)),
                "eb": lambda v: (f"gamma {v:g}", dict(strategy="eb", eb_gamma=v))}
        return [(f"cache {c}, {s}, {knob[s](v)[0]}, rep. penalty {rp:g}",
                 dict(base, cache=c, repetition_penalty=rp, **knob[s](v)[1])) for c, s, v, rp in CURATED]
    grid = []
    for cache in args.caches:
        for strategy in args.strategies:
            if strategy == "confidence":
                knobs = [(f"{s} steps", dict(steps=s)) for s in args.steps]
            elif strategy == "threshold":
                knobs = [(f"p >= {t}", dict(confidence_threshold=t)) for t in args.thresholds]
            else:
                knobs = [(f"gamma {g:g}", dict(strategy="eb", eb_gamma=g)) for g in args.gammas]
            for label, kw in knobs:
                grid.append((f"cache {cache}, {strategy}, {label}", dict(base, cache=cache, **kw)))
    return grid


def quality(prompts: PromptSet, new_ids, tokenizer, scorer) -> dict:
    d = diversity(new_ids)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
    ppl = scorer.perplexity(prompts.prompts, texts) if scorer is not None else float("nan")
    return {"gen_ppl": ppl, "distinct_2": d["distinct-2"], "repetition_2": d["repetition-2"]}


def subset(prompts: PromptSet, n: int) -> PromptSet:
    return PromptSet(prompts.prompts[:n], prompts.prompt_ids[:n], prompts.references[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a model directory or bundled name (default: a random preset model)")
    ap.add_argument("--ar-checkpoint", default=None, help="a trained AR baseline (`textdiffusion train --objective ar`)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--grid", choices=["default", "full"], default="default",
                    help="default: the curated rows (CURATED); full: --caches x --strategies x their knobs")
    ap.add_argument("--caches", nargs="+", default=["none", "prefix", "dual"])
    ap.add_argument("--strategies", nargs="+", default=["confidence", "threshold", "eb"])
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5])
    ap.add_argument("--gammas", type=float, nargs="+", default=[4.0, 16.0])
    ap.add_argument("--original-steps", type=int, nargs="+", default=[64], help="steps of the original loop's rows")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (best is kept)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="thread counts to time every row at; each row keeps its fastest (default: the current "
                         "count). More than one thread is timed by wall clock: use an idle machine")
    ap.add_argument("--dtypes", nargs="+", default=["float32"],
                    help="precision of every model in the run (float32 here: this CPU has no bf16 units)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="also time uncached rows with torch.compile (CUDA graphs on GPU)")
    ap.add_argument("--no-original", action="store_true", help="skip the original loop (slow at many steps)")
    ap.add_argument("--scorer", default="smollm2", help="gen-PPL scorer: smollm2, gemma3, a causal LM ('none' to skip)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    ap.add_argument("--out", default="benchmarks/results/generation_speed")
    args = ap.parse_args()
    args.threads = args.threads or [torch.get_num_threads()]
    if any(n < 1 for n in args.threads):
        ap.error(f"--threads must be positive, got {args.threads}")
    if args.quick:
        args.preset, args.vocab_size, args.max_length, args.batch_sizes, args.repeats = "micro", 512, 32, [1, 4], 1
        args.steps, args.gammas, args.original_steps, args.block_length, args.scorer = [4], [8.0], [4], 8, "none"
        args.grid = "full"
        args.dtypes = ["float32"] if args.device == "cpu" else args.dtypes
    gen = load(args)
    from textdiffusion.core.data import load_corpus

    new_tokens = args.max_length - args.prompt_tokens - 2  # [cls] prompt masks [sep]
    prompts = prompts_from_documents(load_corpus("wiki-vital").validation, gen.tokenizer, max(args.batch_sizes),
                                     args.prompt_tokens, new_tokens, "wiki-vital")
    scorer = None
    if args.scorer != "none":
        from textdiffusion.models.quality import Scorer

        scorer = Scorer.load(args.scorer)
    grid = settings_grid(args)
    common = dict(max_length=args.max_length, top_k=50, sampling="topk")
    rows = []
    for dtype in args.dtypes:
        gen.model.to(getattr(torch, dtype))
        variants = [(gen, "")]
        if args.compile:
            variants.append((DiffusionGenerator(gen.model, gen.tokenizer, gen.config, device=args.device, compile=True),
                             ", compiled"))
        for g, tag in variants:
            for name, kw in grid:
                if tag and kw.get("cache", "none") != "none":
                    continue  # the cached path is eager
                row = {"sampler": f"textdiffusion ({dtype}{tag})", "setting": name, "dtype": dtype}
                for b in sorted(args.batch_sizes, reverse=True):  # the largest batch first: its samples are scored
                    part = subset(prompts, b)
                    out = diffusion_continuations(g, part, new_tokens, **common, **kw)  # scored below
                    s, n = fastest(lambda: diffusion_continuations(g, part, new_tokens, **common, **kw), args.repeats,
                                   args.threads)
                    row[f"tps_b{b}"], row[f"nfe_b{b}"], row[f"threads_b{b}"] = b * new_tokens / s, out.nfe, n
                    if b == max(args.batch_sizes):
                        row.update(quality(part, out.new_ids, gen.tokenizer, scorer))
                rows.append(row)
                print(json.dumps(row), flush=True)
        if not args.no_original:  # one sample at a time, per-position Python loops, float32 as it was
            gen.model.to(torch.float32)
            for steps in args.original_steps:
                run = lambda p: generate_original(gen.model, gen.tokenizer, p, args.max_length, steps, return_ids=True)  # noqa: E731
                s, n = fastest(lambda: run(prompts.prompts[0]), args.repeats, args.threads)
                new_ids = [run(p) for p in prompts.prompts]
                row = {"sampler": "original loop (float32)", "setting": f"remask-random, {steps} steps", "dtype": "float32",
                       "tps_b1": new_tokens / s, "nfe_b1": steps, "threads_b1": n}
                row.update(quality(prompts, new_ids, gen.tokenizer, scorer))
                rows.append(row)
                print(json.dumps(row), flush=True)
            gen.model.to(getattr(torch, dtype))
        ar = ar_baseline(args, gen.tokenizer, getattr(torch, dtype))  # NFE = new tokens, whatever the steps
        row = {"sampler": f"AR baseline, KV cache ({dtype})", "setting": "trained" if args.ar_checkpoint else "random init (speed only)",
               "dtype": dtype}
        for b in sorted(args.batch_sizes, reverse=True):
            part = subset(prompts, b)
            s, n = fastest(lambda: ar.generate_ids(part.prompts, new_tokens, min_new_tokens=new_tokens), args.repeats,
                           args.threads)
            row[f"tps_b{b}"], row[f"nfe_b{b}"], row[f"threads_b{b}"] = b * new_tokens / s, new_tokens, n
        if args.ar_checkpoint:
            new_ids = ar.generate_ids(prompts.prompts, new_tokens, min_new_tokens=new_tokens)
            row.update(quality(prompts, new_ids, gen.tokenizer, scorer))
        else:
            row.update(gen_ppl=float("nan"), distinct_2=float("nan"), repetition_2=float("nan"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = quality(prompts, prompts.references, gen.tokenizer, scorer)
    write(args, rows, reference, new_tokens)


def write(args, rows: list[dict], reference: dict, new_tokens: int) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = ("wall clock" if args.device == "cuda" else
             "process CPU time at 1 thread, wall clock at more" if min(args.threads) == 1 else "wall clock")
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.machine()} CPU, each row at its best of {'/'.join(map(str, args.threads))} thread(s) "
                    f"on core(s) {','.join(map(str, sorted(os.sched_getaffinity(0))))}, timed by {clock}")
    meta = {"command": "python " + " ".join(sys.argv), "machine": machine, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "model": args.checkpoint or f"preset {args.preset} (random init)",
            "ar_model": args.ar_checkpoint or "random init (speed only)", "max_length": args.max_length,
            "prompt_tokens": args.prompt_tokens, "new_tokens_per_sample": new_tokens,
            "block_length": args.block_length, "scorer": args.scorer, "reference": reference}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    batches = sorted(args.batch_sizes)
    ar = next(r for r in rows if r["sampler"].startswith("AR"))
    original = next((r for r in rows if r["sampler"].startswith("original")), None)

    def fmt(v, spec):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    head = ["sampler", "setting"] + [f"calls b{b}" for b in batches] + [f"tokens/s b{b}" for b in batches] + \
        [f"threads b{b}" for b in batches] + [f"vs AR b{b}" for b in batches] + \
        ["vs original b1", "gen PPL", "distinct-2", "repetition-2"]
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {machine}, torch {meta['torch']}, {meta['date']}  ",
             f"Model: {meta['model']}; AR baseline: {meta['ar_model']}; {args.max_length} tokens per sample "
             f"(prompt {args.prompt_tokens}, {new_tokens} generated), blocks of {args.block_length}; "
             f"gen PPL under {args.scorer}", "",
             f"Real text (the documents' own next {new_tokens} tokens): gen PPL {fmt(reference['gen_ppl'], '.1f')}, "
             f"distinct-2 {reference['distinct_2']:.3f}, repetition-2 {reference['repetition_2']:.3f}", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["sampler"], r["setting"]] + [str(r.get(f"nfe_b{b}", "")) for b in batches]
        cells += [fmt(r.get(f"tps_b{b}"), ".0f") for b in batches]
        cells += [str(r.get(f"threads_b{b}", "")) for b in batches]
        cells += [fmt(r[f"tps_b{b}"] / ar[f"tps_b{b}"], ".2f") + "x" if f"tps_b{b}" in r else "" for b in batches]
        cells.append(fmt(r["tps_b1"] / original["tps_b1"], ".1f") + "x" if original and "tps_b1" in r else "")
        cells += [fmt(r["gen_ppl"], ".1f"), fmt(r["distinct_2"], ".3f"), fmt(r["repetition_2"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *goal_lines(rows, batches, ar, original), "", "![frontier](frontier.png)"]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    frontier(out_dir / "frontier.png", rows, batches, meta)
    print("\n".join(lines))


def at_equal_quality(rows: list[dict], reference: dict, b: int) -> dict | None:
    """The fastest diffusion row at batch b whose gen PPL is at most the reference's and whose distinct-2 is
    at most 5 % below it (the issue's "equal quality"), or None."""
    ok = [r for r in rows if r["sampler"].startswith("textdiffusion") and f"tps_b{b}" in r
          and r["gen_ppl"] <= reference["gen_ppl"] and r["distinct_2"] >= 0.95 * reference["distinct_2"]]
    return max(ok, key=lambda r: r[f"tps_b{b}"], default=None)


def goal_lines(rows: list[dict], batches: list[int], ar: dict, original: dict | None) -> list[str]:
    """The speed goals, checked from the table: each ratio at equal quality, or why there is none."""
    lines = ["Goals (each side at its best thread count; equal quality = gen PPL at most the other's, distinct-2 "
             "at most 5 % below it):", ""]
    diffusion = [r for r in rows if r["sampler"].startswith("textdiffusion")]
    for b, goal in ((1, 2.0), (16, 1.0)):
        if b not in batches:
            continue
        if math.isnan(ar.get("gen_ppl", float("nan"))):
            lines.append(f"- batch {b}, >= {goal:g}x AR: AR untrained here, quality not compared (pass --ar-checkpoint)")
            continue
        best = at_equal_quality(rows, ar, b)
        fastest_row = max(diffusion, key=lambda r: r[f"tps_b{b}"])
        if best is None:
            closest = min(diffusion, key=lambda r: r["gen_ppl"])
            lines.append(f"- batch {b}, >= {goal:g}x AR at equal quality: **not met** — no diffusion row reaches AR's "
                         f"gen PPL {ar['gen_ppl']:.1f} (closest: {closest['setting']}, {closest['gen_ppl']:.1f} at "
                         f"{closest[f'tps_b{b}'] / ar[f'tps_b{b}']:.2f}x); fastest row: {fastest_row['setting']}, "
                         f"{fastest_row[f'tps_b{b}'] / ar[f'tps_b{b}']:.2f}x at gen PPL {fastest_row['gen_ppl']:.1f}")
            continue
        ratio = best[f"tps_b{b}"] / ar[f"tps_b{b}"]
        lines.append(f"- batch {b}, >= {goal:g}x AR at equal quality: **{'met' if ratio >= goal else 'not met'}**, "
                     f"{ratio:.2f}x ({best['setting']}, gen PPL {best['gen_ppl']:.1f} vs {ar['gen_ppl']:.1f})")
    if original is not None and not math.isnan(original["gen_ppl"]):
        best = at_equal_quality(rows, original, 1)
        if best is None:
            lines.append(f"- >= 20x the original loop at equal quality: **not met** — no row reaches its gen PPL "
                         f"{original['gen_ppl']:.1f}")
        else:
            ratio = best["tps_b1"] / original["tps_b1"]
            lines.append(f"- >= 20x the original loop at equal quality (batch 1): **{'met' if ratio >= 20 else 'not met'}**, "
                         f"{ratio:.1f}x ({best['setting']}, gen PPL {best['gen_ppl']:.1f} vs {original['gen_ppl']:.1f})")
    return lines


def frontier(path: Path, rows: list[dict], batches: list[int], meta: dict) -> None:
    """tokens/s (x) against gen PPL (y, lower is better), one panel per batch size; AR as a point or,
    untrained, as a vertical line at its speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    colours = {"none": "tab:blue", "prefix": "tab:orange", "dual": "tab:green"}
    for ax, b in zip(axes[0], batches):
        for r in rows:
            tps, ppl = r.get(f"tps_b{b}"), r.get("gen_ppl", float("nan"))
            if tps is None:
                continue
            if r["sampler"].startswith("AR"):
                if math.isnan(ppl):
                    ax.axvline(tps, color="black", ls="--", label="AR + KV cache (speed only)")
                else:
                    ax.scatter([tps], [ppl], marker="*", s=200, color="black", label="AR + KV cache")
                continue
            if math.isnan(ppl):
                continue
            setting = r["setting"]
            cache = next((c for c in colours if f"cache {c}," in setting), None)
            marker = "s" if "threshold" in setting else ("^" if "eb," in setting else "o")
            colour = colours.get(cache, "grey") if not r["sampler"].startswith("original") else "red"
            ax.scatter([tps], [ppl], marker=marker, color=colour, alpha=0.8)
            ax.annotate(setting.replace("cache ", "").replace(", ", " ")[:28], (tps, ppl), fontsize=6, alpha=0.7)
        ref = meta["reference"]["gen_ppl"]
        if not math.isnan(ref):
            ax.axhline(ref, color="grey", ls=":", label="real text")
        ax.set_xscale("log")
        ax.set_xlabel(f"tokens/s at batch {b} (log)")
        ax.set_ylabel("gen PPL (lower is better)")
        ax.set_title(f"batch {b}: colour = cache (blue none, orange prefix, green dual, red original)\n"
                     "o confidence, s threshold, ^ eb", fontsize=8)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
