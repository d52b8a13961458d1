"""A block-diffusion SmolLM2 (`smollm2-bd`) against SmolLM2 itself writing left to right: quality, tokens per call
and speed, on the same prompts, the same tokenizer and the same number of new tokens.

    OMP_NUM_THREADS=1 python benchmarks/block_compare.py                 # the table in the model card (~30 min)
    python benchmarks/block_compare.py --checkpoint runs/smollm2-bd --out /tmp/bc --num-prompts 8 --new-tokens 16
    python benchmarks/block_compare.py --quick --checkpoint DIR --base DIR   # seconds: what the test suite runs

Both sides share SmolLM2's tokenizer, so this compares per token (benchmarks/pretrained_compare.py compares
models of different tokenizers per word). Rows:

* **SmolLM2, left to right** — Transformers' KV-cached ``generate`` at each --temperatures (top-k 50, its
  repetition penalty 1.1), never stopping at end-of-text (``min_new_tokens``);
* **smollm2-bd** through this project's decoder (DenoisingRun and the exact block cache), end-of-text suppressed
  so it writes as many tokens: one token per call left to right (the decoder's own speed at AR's order), every
  --thresholds (the leftmost mask always, and each next one while its probability reaches the threshold;
  ``--commit confidence`` for Fast-dLLM's rule: the most confident always), and --fixed tokens per call (the
  most confident, a fixed count).

Likelihood (``--eval-blocks N``): the block NELBO of the checkpoint (each block's bound given the clean blocks
before it) beside SmolLM2's exact NLL on the same tokens of the same N validation blocks.

Per row: gen PPL under each --scorers model with a 95% bootstrap interval over prompts (Gemma-3-270M shares no
weights with SmolLM2; SmolLM2 judging itself is biased toward both rows), distinct-2 and the doubled-word rate on
token ids, tokens per model call (per row, averaged over rows), and tokens/s at each --batches (the first b
prompts, best of --repeats; process CPU time at one thread, wall clock with more) in the same run. Writes
results.json (every sample) and README.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import best_of  # noqa: E402

from textdiffusion.core.data import load_corpus
from textdiffusion.core.metrics import distinct_n, doubled_rate
from textdiffusion.models.adapt import load_causal_for_adaptation
from textdiffusion.models.autoregressive import CausalGenerator
from textdiffusion.models.quality import Scorer, prompts_from_documents, tokens_per_call
from textdiffusion.pipelines.generation import DiffusionGenerator


def bootstrap_ppl(parts: list[tuple[float, int]], draws: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Pooled gen PPL and its 95% interval, resampling prompts."""
    nll = torch.tensor([s for s, _ in parts], dtype=torch.float64)
    n = torch.tensor([c for _, c in parts], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(parts), (draws, len(parts)), generator=g)
    ppl = (nll[idx].sum(1) / n[idx].sum(1)).exp()
    lo, hi = ppl.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float(nll.sum() / n.sum())), lo, hi


class BlockSide:
    """The block model through DenoisingRun: continuations, and how many model calls each row took part in."""

    def __init__(self, generator: DiffusionGenerator, new_tokens: int):
        self.g, self.new_tokens = generator, new_tokens

    def run(self, prompts: list[str], seed: int, **sampler) -> tuple[list[list[int]], float]:
        """(new token ids per prompt, tokens per call averaged over rows)."""
        return tokens_per_call(self.g, prompts, self.new_tokens, seed, **sampler)


def settings(args) -> list[tuple[str, dict]]:
    """(name, sampler settings) of every block-model row."""
    # every setting explicit: the checkpoint's saved defaults (a threshold, say) must not leak into a row
    base = dict(sampling="topk", top_k=50, repetition_penalty=1.1, order_temperature=0.0, confidence_threshold=None)
    n = args.new_tokens
    rows = []
    for t in args.block_temperatures:
        common = {**base, "temperature": t}
        rows.append((f"smollm2-bd T {t}, 1 token/call left to right", {**common, "strategy": "left-to-right", "steps": n}))
        for tau in args.thresholds:
            strategy = "left-to-right" if args.commit == "left-to-right" else "confidence"
            rows.append((f"smollm2-bd T {t}, threshold {tau} ({args.commit} first)",
                         {**common, "strategy": strategy, "confidence_threshold": tau, "steps": n}))
        for k in args.fixed:
            rows.append((f"smollm2-bd T {t}, {k} tokens/call (most confident)",
                         {**common, "strategy": "confidence", "steps": max(1, n // k)}))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="smollm2-bd")
    ap.add_argument("--base", default="smollm2", help="The causal LM the AR rows run (as `train --model-name`).")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 1.0], help="AR rows.")
    ap.add_argument("--block-temperatures", type=float, nargs="+", default=[0.6])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.9, 0.7, 0.5])
    ap.add_argument("--commit", choices=["left-to-right", "confidence"], default="left-to-right")
    ap.add_argument("--fixed", type=int, nargs="*", default=[2])
    ap.add_argument("--scorers", nargs="*", default=["gemma3", "smollm2"])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-blocks", type=int, default=64, help="Validation blocks for the likelihood line (0: none).")
    ap.add_argument("--out", default="benchmarks/results/block_compare")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 8 tokens, no scorer, batch 1: a smoke run.")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts, args.prompt_tokens, args.new_tokens = 4, 8, 8
        args.scorers, args.batches, args.repeats, args.thresholds = [], [1], 1, [0.5]
        args.eval_blocks = 2
        args.temperatures, args.block_temperatures = [1.0], [1.0]
    torch.manual_seed(args.seed)

    block = DiffusionGenerator.from_pretrained(args.checkpoint, device="cpu")
    side = BlockSide(block, args.new_tokens)
    tok_ar, model_ar = load_causal_for_adaptation(args.base, flag="--base")
    ar = CausalGenerator(model_ar, tok_ar, torch.device("cpu"))
    docs = load_corpus("wiki-vital").validation
    prompts = prompts_from_documents(docs, block.tokenizer, args.num_prompts, args.prompt_tokens, args.new_tokens,
                                     "wiki-vital")
    rows = []

    def ar_ids(texts, t, seed=args.seed):
        return ar.generate_ids(texts, args.new_tokens, temperature=t, top_k=50, repetition_penalty=1.1, seed=seed,
                               min_new_tokens=args.new_tokens)

    for t in args.temperatures:
        started = time.perf_counter()
        ids = ar_ids(prompts.prompts, t)
        rows.append({"setting": f"SmolLM2 left to right, T {t}", "kind": "ar", "temperature": t, "new_ids": ids,
                     "tokens_per_call": 1.0, "seconds_full_batch": time.perf_counter() - started,
                     "speed": {b: lambda b=b, t=t: ar_ids(prompts.prompts[:b], t) for b in args.batches}})
    for name, sampler in settings(args):
        started = time.perf_counter()
        ids, per_call = side.run(prompts.prompts, args.seed, **sampler)
        rows.append({"setting": name, "kind": "block", "sampler": sampler, "new_ids": ids, "tokens_per_call": per_call,
                     "seconds_full_batch": time.perf_counter() - started,
                     "speed": {b: lambda b=b, s=sampler: side.run(prompts.prompts[:b], args.seed, **s)
                               for b in args.batches}})
        print(f"{name}: {per_call:.2f} tokens/call, {rows[-1]['seconds_full_batch']:.0f} s", flush=True)

    likelihood = None
    if args.eval_blocks:
        likelihood = likelihood_line(block, ar.model, args.eval_blocks)
        print(likelihood, flush=True)
    tokenizer = block.tokenizer
    for row in rows:
        row["texts"] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in row["new_ids"]]
        row["distinct_2"] = distinct_n(row["new_ids"], 2)
        row["doubled"] = doubled_rate(row["new_ids"])
        row["tokens_per_second"] = {}
        for b, fn in row.pop("speed").items():
            fn()  # warm-up
            seconds = best_of(fn, args.repeats)
            row["tokens_per_second"][b] = b * args.new_tokens / seconds
    for spec in args.scorers:
        scorer = Scorer.load(spec)
        for row in rows:
            parts = scorer.nlls(prompts.prompts, row["texts"])
            row[f"gen_ppl_{spec}"] = bootstrap_ppl(parts)
        del scorer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_line()
    report = render(rows, args, prompts, machine, likelihood)
    (out / "README.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "machine": machine, "prompts": prompts.prompts,
                                                  "likelihood": likelihood, "rows": rows}, indent=1, default=str) + "\n")
    print(report)
    return 0


def likelihood_line(block: DiffusionGenerator, causal, n_blocks: int) -> dict:
    """The block NELBO of the block model and the causal model's exact NLL, on the same tokens (every token after
    the first block that is not padding or special) of the first ``n_blocks`` wiki-vital validation blocks."""
    from textdiffusion.core.data import pack
    from textdiffusion.models.autoregressive import causal_nll
    from textdiffusion.models.block import block_nelbo, scoring_corruption

    tok = block.tokenizer
    blocks = pack(load_corpus("wiki-vital").validation, tok, block.config.max_length, keep_remainder=True)[:n_blocks]
    corruption = scoring_corruption(tok, block.config.block_size, causal=True)
    bound = block_nelbo(block.denoiser, blocks, corruption, samples_per_block=4, batch_size=16)
    exact = causal_nll(causal, blocks, corruption.maskable(blocks), batch_size=16)
    return {"blocks": len(blocks), "tokens": bound.tokens, "block_nelbo": bound.nats_per_token,
            "block_nelbo_stderr": bound.stderr, "ar_nll": exact.nats_per_token, "ar_nll_stderr": exact.stderr}


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"commit {commit or '?'}, {time.strftime('%Y-%m-%d')}")


def render(rows, args, prompts, machine: str, likelihood: dict | None = None) -> str:
    scorers = args.scorers
    head = ["setting", *[f"gen PPL ({s}) [95% CI]" for s in scorers], "distinct-2", "doubled",
            "tokens/call", *[f"tok/s b={b}" for b in args.batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["setting"]]
        for s in scorers:
            p, lo, hi = r[f"gen_ppl_{s}"]
            cells.append(f"{p:.1f} [{lo:.1f}, {hi:.1f}]")
        cells += [f"{r['distinct_2']:.3f}", f"{100 * r['doubled']:.2f} %", f"{r['tokens_per_call']:.2f}"]
        cells += [f"{r['tokens_per_second'][b]:.1f}" for b in args.batches]
        lines.append("| " + " | ".join(cells) + " |")
    overtakes = []
    for r in rows:
        if r["kind"] != "block":
            continue
        ar = next((a for a in rows if a["kind"] == "ar" and a["temperature"] == r["sampler"]["temperature"]), None)
        if ar is None:
            continue
        faster = [b for b in args.batches if ar["tokens_per_second"][b] >= r["tokens_per_second"][b]]
        if not args.batches:
            continue
        overtakes.append(f"- {r['setting']}: " + (f"the AR is at least as fast from batch {faster[0]} on"
                                                   if faster else "faster than the AR at every batch measured"))
    samples = next((r for r in rows if r["kind"] == "block"), rows[0])
    return "\n".join([
        "# smollm2-bd against SmolLM2 left to right", "",
        f"Command: `python benchmarks/block_compare.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine}  ",
        f"{len(prompts.prompts)} wiki-vital validation prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
        "tokens each (no end-of-text stop on either side), top-k 50, repetition penalty 1.1, seed "
        f"{args.seed}. Speed: the first b prompts, best of {args.repeats}.", "",
        *lines, "", *(["Where the AR overtakes:", *overtakes, ""] if overtakes else []),
        *([f"Likelihood on {likelihood['blocks']} validation blocks ({likelihood['tokens']:,} tokens after the first "
           f"block): block NELBO {likelihood['block_nelbo']:.3f} ± {likelihood['block_nelbo_stderr']:.3f} nats/token "
           f"(an upper bound), SmolLM2's exact NLL {likelihood['ar_nll']:.3f} ± {likelihood['ar_nll_stderr']:.3f}.", ""]
          if likelihood else []),
        f"First three samples of '{samples['setting']}':", "",
        *[f"> {p}**{t}**" for p, t in zip(prompts.prompts[:3], samples["texts"][:3])], ""])


if __name__ == "__main__":
    raise SystemExit(main())
