"""The decisive table of distillation: teacher and student at several step counts against the same-size AR model.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/distill.py --student runs/wiki-small-sdtt
    python benchmarks/distill.py --quick          # seconds: the test suite's smoke run (no scorer)

For every model and step count, on the same prompts and seeds (the first ``--num-prompts`` validation documents
of wiki-vital long enough, ``--prompt-tokens`` of prompt and ``--new-tokens`` generated): gen PPL under the
offline SmolLM2 scorer with a bootstrap 95 % interval over prompts, distinct-2, token entropy, and tokens/s at
batch 1 and 16 (``generation_speed.timed``: best of ``--repeats`` after a warm-up, process CPU time at one thread). The teacher runs with
the student's settings (the teacher's saved generation defaults at each step count), so a difference is the
distillation's, not the tuning's; the AR model gets its own sampling penalty swept. Results: README.md,
results.json and frontier.png in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from generation_speed import subset, timed  # one timing rule for every speed table: CPU time at one thread

from textdiffusion.core.data import load_corpus
from textdiffusion.core.detokenize import decode_text
from textdiffusion.core.metrics import diversity
from textdiffusion.models.autoregressive import CausalGenerator
from textdiffusion.models.quality import (
    Scorer,
    causal_continuations,
    diffusion_continuations,
    prompts_from_documents,
)
from textdiffusion.pipelines.generation import DiffusionGenerator


def bootstrap_ppl(parts: list[tuple[float, int]], draws: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Pooled gen PPL and its 95 % bootstrap interval over prompts."""
    nll = torch.tensor([p[0] for p in parts], dtype=torch.float64)
    tok = torch.tensor([p[1] for p in parts], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(parts), (draws, len(parts)), generator=g)
    ppl = torch.exp(nll[idx].sum(1) / tok[idx].sum(1))
    lo, hi = torch.quantile(ppl, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float(nll.sum() / tok.sum())), lo, hi


def row_for(name, new_ids, texts, prompts, tokenizer, scorer, nfe, speed) -> dict:
    row = {"model": name, "nfe": nfe, **diversity(new_ids), **speed}
    if scorer is not None:
        continuations = [decode_text(tokenizer, ids) for ids in new_ids]
        row["gen_ppl"], row["ppl_lo"], row["ppl_hi"] = bootstrap_ppl(scorer.nlls(prompts.prompts, continuations))
    else:
        row["gen_ppl"] = row["ppl_lo"] = row["ppl_hi"] = float("nan")
    row["example"] = texts[0].replace("\n", " ")[:160]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="wiki-small")
    ap.add_argument("--student", default="runs/wiki-small-sdtt")
    ap.add_argument("--ar", default="wiki-small-ar")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--ar-penalties", type=float, nargs="+", default=[1.0, 1.1, 1.3])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=118)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--scorer", default="smollm2", help="gen-PPL scorer: smollm2, gemma3, a causal LM ('none' to skip)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and no scorer: the test suite's smoke run")
    ap.add_argument("--out", default="benchmarks/results/distill")
    args = ap.parse_args()
    if args.quick:
        args.student = args.teacher  # the pipeline, not a result: the bundled model on both sides
        args.steps, args.ar_penalties, args.num_prompts, args.new_tokens = [4], [1.1], 2, 16
        args.batch_sizes, args.scorer = [1, 2], "none"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {len(os.sched_getaffinity(0))} available to the run, "
               f"{threads} torch thread(s), load average {os.getloadavg()[0]:.1f} at the start, no GPU")
    scorer = Scorer.load(args.scorer) if args.scorer != "none" else None
    docs = load_corpus("wiki-vital").validation
    rows = []
    for label, path in (("teacher", args.teacher), ("student", args.student)):
        gen = DiffusionGenerator.from_pretrained(path)
        prompts = prompts_from_documents(docs, gen.tokenizer, args.num_prompts, args.prompt_tokens, args.new_tokens,
                                         "wiki-vital")
        for steps in args.steps:
            cont = diffusion_continuations(gen, prompts, args.new_tokens, steps=steps)
            speed = {}
            for b in args.batch_sizes:
                part = subset(prompts, b)
                s = timed(lambda: diffusion_continuations(gen, part, args.new_tokens, steps=steps), args.repeats)
                speed[f"tps_b{b}"] = b * args.new_tokens / s
            rows.append(row_for(f"{label} ({path}), {steps} steps", cont.new_ids, cont.texts, prompts, gen.tokenizer,
                                scorer, cont.nfe, speed))
            rows[-1].update(kind=label, steps=steps)
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}), flush=True)
    ar = CausalGenerator.from_pretrained(args.ar, torch.device("cpu"))
    prompts = prompts_from_documents(docs, ar.tokenizer, args.num_prompts, args.prompt_tokens, args.new_tokens,
                                     "wiki-vital")
    for penalty in args.ar_penalties:
        kw = dict(top_k=50, repetition_penalty=penalty)
        cont = causal_continuations(ar, prompts, args.new_tokens, **kw)
        speed = {}
        for b in args.batch_sizes:
            part = subset(prompts, b)
            s = timed(lambda: causal_continuations(ar, part, args.new_tokens, **kw), args.repeats)
            speed[f"tps_b{b}"] = b * args.new_tokens / s
        rows.append(row_for(f"AR ({args.ar}), penalty {penalty}", cont.new_ids, cont.texts, prompts, ar.tokenizer,
                            scorer, args.new_tokens, speed))
        rows[-1].update(kind="ar", steps=args.new_tokens, penalty=penalty)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}), flush=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2) + "\n")
    (out / "README.md").write_text(markdown(rows, args, machine))
    plot(rows, out / "frontier.png", args)
    print(markdown(rows, args, machine))


def markdown(rows, args, machine) -> str:
    b = args.batch_sizes
    lines = ["# Distillation: teacher and student against the same-size AR model", "",
             f"`python benchmarks/distill.py {' '.join(sys.argv[1:])}` on {machine}. {args.num_prompts} prompts of "
             f"{args.prompt_tokens} tokens from wiki-vital's validation split, {args.new_tokens} new tokens each, the "
             "same prompts and seeds for every row; gen PPL under SmolLM2-135M with a bootstrap 95 % interval over "
             "prompts.", "",
             f"| model | model calls | gen PPL [95 % CI] | distinct-2 | entropy (bits) | tokens/s b{b[0]} | tokens/s b{b[-1]} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ppl = "n/a" if math.isnan(r["gen_ppl"]) else f"{r['gen_ppl']:.1f} [{r['ppl_lo']:.1f}, {r['ppl_hi']:.1f}]"
        lines.append(f"| {r['model']} | {r['nfe']} | {ppl} | {r['distinct-2']:.3f} | {r['entropy-bits']:.2f} | "
                     f"{r[f'tps_b{b[0]}']:.0f} | {r[f'tps_b{b[-1]}']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    b = args.batch_sizes[0]
    for kind, marker in (("teacher", "o"), ("student", "s"), ("ar", "^")):
        pts = [(r[f"tps_b{b}"], r["gen_ppl"], r["steps"]) for r in rows if r["kind"] == kind]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
        for x, y, s in pts:
            ax.annotate(str(s) if kind != "ar" else "", (x, y), fontsize=7)
    ax.set_xlabel(f"tokens/s at batch {b}")
    ax.set_ylabel("gen PPL (SmolLM2), lower is better")
    ax.set_xscale("log")
    ax.legend()
    ax.set_title("Quality against speed: teacher, distilled student, AR")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
