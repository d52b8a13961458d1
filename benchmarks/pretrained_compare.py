"""Text models with different tokenizers and decoders, side by side in units that do not depend on either.

    OMP_NUM_THREADS=2 python benchmarks/pretrained_compare.py      # wiki-small, smollm2-wiki (swept), SmolLM2 as AR
    OMP_NUM_THREADS=2 python benchmarks/pretrained_compare.py --checkpoints wiki-small mpnet-wiki smollm2-wiki
    python benchmarks/pretrained_compare.py --quick                # seconds; what the test suite runs

wiki-small (byte-level BPE of 4k, cased), mpnet-wiki (WordPiece of 30k, lowercase), smollm2-wiki (SmolLM2-135M
adapted to diffusion, BPE of 49k) and SmolLM2 itself writing left to right cannot be compared per token: a
token of one carries a different amount of text, and a lowercase model never writes a capital. So every
number here is per word, per byte or on the same text:

* **likelihood** — `textdiffusion eval` on validation blocks of each diffusion model's own tokenizer: NELBO in
  nats per token, nats per word and bits per byte (the bound divided by the words / UTF-8 bytes of the text);
  the causal rows' exact NLL on blocks of their tokenizer, in the same units;
* **generation** — every model continues the same prompts (the first --prompt-words words of validation
  documents, listed in the report) by about --new-words words with the same seed: each gets
  ``new_words / words_per_token`` new tokens (its own words per token, measured on the validation split),
  rounded to whole blocks of every block length in use, so a setting commits exactly its tokens per call.
  Diffusion rows: blocks of --block-length, --tokens-per-call committed per model call, top-k 50, repetition
  penalty, dual cache; a model named in --sweep runs a grid of block lengths, tokens per call (or
  --sweep-thresholds: every token at least that likely, Fast-dLLM's parallel decoding) and --sweep-temperatures
  instead (one token per call is AR decoding by another name: the headline setting commits at least 2). Causal
  rows: KV-cached `generate`, top-k 50, their own repetition penalty, one row per --ar-temperatures (so the
  headline is compared with the causal model at the same temperature). Gen PPL under every --scorers model (SmolLM2-135M is biased
  toward a model adapted from it; Gemma-3-270M shares no weights with any model here), as written — a lowercase
  model's prompt and text are lowercase — beside the same scorer on the model's own round trip of the real
  continuation. Diversity (distinct-2, repetition-2) is on lowercased words and punctuation, not on token ids;
* **speed** — words of generated text per second at the full batch (the scored run itself, or the best of it and
  --repeats reruns) and at batch 1 (the first prompt, after a warm-up); process CPU time at one thread, wall clock
  at more (then use an idle machine).

Writes results.json (every sample included) and README.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import best_of, timed  # noqa: E402

from textdiffusion.core.detokenize import decode_text
from textdiffusion.core.metrics import distinct_n, doubled_rate, repetition_rate
from textdiffusion.models.quality import PromptSet, causal_continuations, diffusion_continuations
from textdiffusion.pipelines.generation import DiffusionGenerator

WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lowercased words and punctuation marks: the same units whatever tokenizer wrote the text."""
    return WORD.findall(text.lower())


def word_prompts(docs, num_prompts: int, prompt_words: int, new_words: int) -> tuple[list[str], list[str]]:
    """(prompts, real continuations): the first documents with enough whitespace words for both."""
    prompts, references = [], []
    for doc in docs:
        w = doc.split()
        if len(w) >= prompt_words + new_words:
            prompts.append(" ".join(w[:prompt_words]))
            references.append(" " + " ".join(w[prompt_words:prompt_words + new_words]))
            if len(prompts) == num_prompts:
                break
    if len(prompts) < num_prompts:
        raise SystemExit(f"only {len(prompts)} validation documents have {prompt_words + new_words} words; "
                         f"lower --num-prompts {num_prompts} or the lengths.")
    return prompts, references


def words_per_token(tokenizer, docs) -> float:
    n_words = sum(len(d.split()) for d in docs)
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    return n_words / n_tokens


def diffusion_likelihood(checkpoint: str, blocks: int, out: Path, python: str) -> dict:
    """`textdiffusion eval` in a subprocess (as a user runs it): the first NELBO row of its eval.json."""
    where = out / "eval" / Path(checkpoint).name
    cmd = [python, "-m", "textdiffusion", "eval", "--checkpoint", checkpoint, "--max-length", "128",
           "--eval-blocks", str(blocks), "--samples-per-block", "2", "--batch-size", "8", "--device", "cpu",
           "--output-dir", str(where), "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((where / "eval.json").read_text())["nelbo"][0]


def sampler_settings(prompt_ids, new_tokens: int, sampler: dict) -> dict:
    """The diffusion sampler for one model and configuration: ``tokens_per_step`` committed per call inside blocks
    of ``block_length`` (steps per block = ceil(block / tokens per step)), or, with ``threshold`` (Fast-dLLM's
    parallel decoding; ``configurations`` gives it 1 token per step, so at most one call per token), every token
    at least that likely and the surest one; top-k 50, dual cache."""
    block = min(sampler["block_length"], new_tokens)
    steps = math.ceil(block / sampler["tokens_per_step"]) * math.ceil(new_tokens / block)
    return dict(block_length=block, steps=steps, sampling="topk", top_k=50, temperature=sampler["temperature"],
                repetition_penalty=sampler["repetition_penalty"], strategy="confidence", cache="dual",
                confidence_threshold=sampler.get("threshold"), max_length=max(map(len, prompt_ids)) + new_tokens + 2)


class CausalModel:
    """A causal LM as a row of its own (SmolLM2 itself, or the AR baseline): it writes left to right with
    Transformers' KV-cached ``generate``, one token per call, and has an exact likelihood."""

    def __init__(self, spec: str):
        from textdiffusion.models.autoregressive import CausalGenerator, load_causal_lm
        from textdiffusion.models.quality import NAMED_SCORERS

        if spec in NAMED_SCORERS:  # the offline GGUF a scorer of that name reads
            from transformers import AutoModelForCausalLM, AutoTokenizer

            where, gguf = NAMED_SCORERS[spec]("--ar", ".")
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32)
        else:
            tokenizer, model = load_causal_lm(spec)
        self.gen = CausalGenerator(model, tokenizer, torch.device("cpu"))
        self.tokenizer, self.model = tokenizer, self.gen.model

    def likelihood(self, docs, blocks: int) -> dict:
        """Exact NLL on the first ``blocks`` validation blocks of 128 tokens, per token, word and byte (the units
        `textdiffusion eval` reports for the diffusion rows; the first token of a block is given, not scored)."""
        from textdiffusion.core.data import pack
        from textdiffusion.core.detokenize import text_units
        from textdiffusion.core.evaluation import scored_positions
        from textdiffusion.models.autoregressive import causal_nll
        from textdiffusion.pipelines.evaluate import per_unit

        packed = pack(docs, self.tokenizer, 128, keep_remainder=True)[:blocks]
        scored = scored_positions(packed, self.tokenizer, 1)
        nll = causal_nll(self.model, packed, scored, batch_size=8)
        units = per_unit(nll.nats_per_token, nll.tokens, *text_units(self.tokenizer, packed, scored))
        return {"nats_per_token": nll.nats_per_token, "stderr": nll.stderr, **units}


def generation(model, prompts: list[str], new_words: int, scorers: dict, repeats: int,
               batches: list[int], sampler: dict, docs, seed: int, quantum: int) -> dict:
    """The model's row. ``model``: a DiffusionGenerator or a :class:`CausalModel`
    (which reads only ``sampler``'s temperature and repetition penalty); ``docs``: texts to measure words per
    token on. The new tokens are the nearest multiple of ``quantum`` (every block length in use) to
    ``new_words``' worth, so every block is whole and a setting commits exactly its tokens per call."""
    tokenizer = model.tokenizer
    wpt = words_per_token(tokenizer, docs[:200])
    new_tokens = max(1, round(new_words / wpt / quantum)) * quantum
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    own_prompts = [decode_text(tokenizer, i) for i in ids]  # as the model sees them (lowercased by MPNet)
    if isinstance(model, CausalModel):
        settings = dict(sampling="topk", top_k=50, temperature=sampler["temperature"],
                        repetition_penalty=sampler["repetition_penalty"])
        continuations = partial(causal_continuations, model.gen)
        row = {"new_tokens": new_tokens, "words_per_token": wpt, "steps": new_tokens, "block_length": 1,
               "commit": "1/call"}
    else:
        settings = sampler_settings(ids, new_tokens, sampler)
        continuations = partial(diffusion_continuations, model)
        row = {"new_tokens": new_tokens, "words_per_token": wpt, "steps": settings["steps"],
               "block_length": settings["block_length"],
               "commit": f"{sampler['tokens_per_step']}/call" if sampler.get("threshold") is None
               else f"p >= {sampler['threshold']:g}"}

    def generate(n):
        part = PromptSet(prompts=own_prompts[:n], prompt_ids=ids[:n], references=[])
        return continuations(part, new_tokens, seed=seed, **settings)

    generate(1)  # warm-up: allocator, kernels
    scored = {}
    full_seconds = best_of(lambda: scored.update(out=generate(len(prompts))), 1)  # the scored run, timed
    out = scored["out"]
    texts = [decode_text(tokenizer, i) for i in out.new_ids]
    row["nfe"], row["tokens_per_call"], row["temperature"] = out.nfe, new_tokens / out.nfe, sampler["temperature"]
    for b in batches:
        if b == len(prompts):  # the scored run, or the best of it and --repeats reruns
            seconds = min(full_seconds, best_of(lambda: generate(b), repeats)) if repeats > 0 else full_seconds
        else:
            seconds = timed(lambda: generate(b), max(1, repeats))
        row[f"words_per_s_b{b}"] = sum(len(t.split()) for t in texts[:b]) / seconds
    row.update(judge(own_prompts, texts, scorers))
    row["samples"] = [(p + " " + t.strip()).replace("\n", " ") for p, t in zip(own_prompts, texts)]
    row["example"] = row["samples"][0]
    return row


def reference(model, prompts: list[str], references: list[str], scorers: dict) -> dict:
    """The real continuations judged like a model's: passed through its tokenizer and back (lowercase for a
    lowercase model), after its own view of the prompts."""
    tokenizer = model.tokenizer
    own = [decode_text(tokenizer, tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts]
    round_trip = [decode_text(tokenizer, tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
    return judge(own, round_trip, scorers)


def judge(prompts: list[str], texts: list[str], scorers: dict) -> dict:
    """Diversity on lowercased words; gen PPL under every scorer, as written (a lowercase model's prompt and
    text are lowercase already)."""
    w = [words(t) for t in texts]
    return {"words": sum(map(len, w)) / len(w), "distinct_2": distinct_n(w, 2), "repetition_2": repetition_rate(w, 2),
            "doubled": doubled_rate(w),
            "gen_ppl": {name: scorer.perplexity(prompts, [" " + t.strip() for t in texts])
                        for name, scorer in scorers.items()}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=["wiki-small", "smollm2-wiki"],
                    help="diffusion models: bundled or built names, or checkpoint folders")
    ap.add_argument("--ar", nargs="*", default=["smollm2"],
                    help="causal LMs as rows of their own: smollm2 (the offline GGUF) or an AR checkpoint (wiki-small-ar)")
    ap.add_argument("--sweep", nargs="*", default=None,
                    help="diffusion models whose block length and tokens per call are swept, one row per setting "
                         "(default: smollm2-wiki when it is among --checkpoints)")
    ap.add_argument("--sweep-blocks", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--sweep-tokens-per-call", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--sweep-thresholds", nargs="*", type=float, default=[],
                    help="also commit by confidence threshold at each swept block and temperature (tokens per call "
                         "then measured, not set)")
    ap.add_argument("--sweep-temperatures", nargs="+", type=float, default=None,
                    help="sampling temperatures swept too (default: --temperature alone)")
    ap.add_argument("--block-length", type=int, default=32, help="the other diffusion rows' blocks")
    ap.add_argument("--tokens-per-call", type=int, default=4, help="the other diffusion rows' tokens committed per call")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--new-words", type=int, default=56)
    ap.add_argument("--eval-blocks", type=int, default=64, help="validation blocks for the likelihood (0: skip it)")
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ar-repetition-penalty", type=float, default=1.1, help="the causal rows' own sampling penalty")
    ap.add_argument("--ar-temperatures", nargs="+", type=float, default=[1.0],
                    help="the causal rows' temperatures, one row each (a swept model's headline is compared with the "
                         "causal row at its own temperature when there is one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=0,
                    help="timed reruns of the full batch beside the scored run (0: the scored run's time)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--scorers", nargs="*", default=["smollm2", "gemma3"],
                    help="gen-PPL scorers: smollm2, gemma3 or a causal LM (none: no gen PPL)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no scorer, no eval, no AR row: for the test suite")
    ap.add_argument("--out", default="benchmarks/results/pretrained_compare")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts, args.new_words, args.eval_blocks, args.scorers, args.repeats = 2, 8, 0, [], 1
        args.ar = [a for a in args.ar if a not in ("smollm2", "gemma3")]
        args.sweep_blocks, args.sweep_tokens_per_call = args.sweep_blocks[:1], args.sweep_tokens_per_call[:2]
    if args.sweep is None:
        args.sweep = [c for c in args.checkpoints if c == "smollm2-wiki"]
    if args.sweep_temperatures is None:
        args.sweep_temperatures = [args.temperature]
    bad_t = [t for t in args.sweep_temperatures + args.ar_temperatures + [args.temperature] if not t > 0]
    if bad_t:
        ap.error(f"temperatures must be > 0, got {bad_t[0]}")
    bad_p = [p for p in args.sweep_thresholds if not 0 < p <= 1]
    if bad_p:
        ap.error(f"--sweep-thresholds must be in (0, 1], got {bad_p[0]}")
    bad = [n for n in args.sweep if n not in args.checkpoints]
    if bad:
        ap.error(f"--sweep {bad[0]!r} is not one of --checkpoints {args.checkpoints}")
    return args


def configurations(args, checkpoint: str) -> list[dict]:
    """The sampler settings a diffusion model is run with: the sweep's grid, or the one shared setting."""
    if checkpoint not in args.sweep:
        grid = [(args.block_length, args.tokens_per_call, None, args.temperature)]
    else:
        grid = [(b, t, p, temp) for temp in args.sweep_temperatures for b in args.sweep_blocks
                for t, p in [(t, None) for t in args.sweep_tokens_per_call if t <= b]
                + [(1, p) for p in args.sweep_thresholds]]
    return [dict(block_length=b, tokens_per_step=t, threshold=p, repetition_penalty=args.repetition_penalty,
                 temperature=temp) for b, t, p, temp in grid]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from textdiffusion.core.data import load_corpus
    from textdiffusion.models.quality import Scorer

    validation = load_corpus("wiki-vital").validation
    quantum = math.lcm(args.block_length, *(args.sweep_blocks if args.sweep else []))
    prompts, references = word_prompts(validation, args.num_prompts, args.prompt_words, args.new_words)
    scorers = {name: Scorer.load(name) for name in args.scorers if name != "none"}
    batches = sorted({1, args.num_prompts})
    rows = []

    def finish(row, reference, checkpoint, model, lowercase, kind, likelihood):
        row.update(checkpoint=checkpoint, kind=kind, parameters=sum(p.numel() for p in model.parameters()),
                   reference=reference, lowercase=lowercase)
        if likelihood is not None:
            row["likelihood"] = likelihood
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("example", "samples")}), flush=True)

    for checkpoint in args.checkpoints:
        gen = DiffusionGenerator.from_pretrained(checkpoint, device="cpu")
        lowercase = bool(getattr(gen.tokenizer, "do_lower_case", False) or gen.tokenizer("A", add_special_tokens=False)
                         ["input_ids"] == gen.tokenizer("a", add_special_tokens=False)["input_ids"])
        likelihood = diffusion_likelihood(checkpoint, args.eval_blocks, Path(args.out), sys.executable) if args.eval_blocks else None
        real = reference(gen, prompts, references, scorers)
        for sampler in configurations(args, checkpoint):
            row = generation(gen, prompts, args.new_words, scorers, args.repeats, batches, sampler, validation,
                             args.seed, quantum)
            finish(row, real, checkpoint, gen.model, lowercase, "diffusion", likelihood)
        del gen
    for spec in args.ar:
        model = CausalModel(spec)
        real = reference(model, prompts, references, scorers)
        likelihood = model.likelihood(validation, args.eval_blocks) if args.eval_blocks else None
        for temperature in args.ar_temperatures:
            sampler = dict(temperature=temperature, repetition_penalty=args.ar_repetition_penalty)
            row = generation(model, prompts, args.new_words, scorers, args.repeats, batches, sampler, validation,
                             args.seed, quantum)
            finish(row, real, spec, model.model, False, "autoregressive", likelihood)
        del model
    write(args, rows, batches, prompts)


def headline(rows: list[dict], checkpoint: str, scorer: str | None) -> dict | None:
    """The row of ``checkpoint`` that the README quotes: at least 2 tokens per call (1 is AR decoding), diverse
    (distinct-2 at least 0.9x its real text's), then the lowest gen PPL under ``scorer`` (the independent one);
    when no setting is that diverse, the most diverse of the >= 2-tokens settings."""
    candidates = [r for r in rows if r["checkpoint"] == checkpoint and r["tokens_per_call"] >= 2]
    if not candidates:
        return None
    diverse = [r for r in candidates if r["distinct_2"] >= 0.9 * r["reference"]["distinct_2"]]
    if diverse and scorer:
        return min(diverse, key=lambda r: r["gen_ppl"][scorer])
    return max(candidates, key=lambda r: r["distinct_2"])


def causal_counterpart(rows: list[dict], top: dict | None) -> dict | None:
    """The causal row a headline is measured against: the first at the headline's temperature, else the first."""
    causal = [r for r in rows if r["kind"] == "autoregressive"]
    if top is None or not causal:
        return None
    return next((r for r in causal if r["temperature"] == top["temperature"]), causal[0])


def write(args, rows: list[dict], batches: list[int], prompts: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} thread(s), timed by "
                       f"{'process CPU time' if args.threads == 1 else 'wall clock'}, fp32", "prompts": prompts,
            "seed": args.seed}
    scorers = [s for s in args.scorers if s != "none"]
    independent = scorers[-1] if scorers else None
    tops = {c: headline(rows, c, independent) for c in args.sweep}
    for top in tops.values():
        if top is not None:
            top["headline"] = True
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    def f(v, spec):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['date']}", "",
             f"Prompts: the first {args.prompt_words} words of the first {args.num_prompts} wiki-vital validation documents "
             f"with {args.prompt_words + args.new_words} words or more (listed below), seed {args.seed} for every model; "
             f"about {args.new_words} words generated per prompt, each model its own tokens' worth (top-k 50 at the "
             f"row's temperature T; diffusion: repetition penalty {args.repetition_penalty}, dual cache, blocks of "
             f"{args.block_length} at {args.tokens_per_call} tokens per call unless swept; the causal rows: KV-cached "
             f"`generate`, one token per call, repetition penalty {args.ar_repetition_penalty}). Gen PPL as written "
             f"(a lowercase model's prompt and text are lowercase) under each scorer, beside the same scorer on the "
             "model's own round trip of the real continuation; distinct-2, repetition-2 and doubled (the share of "
             "adjacent pairs that are one word twice) on lowercased words and punctuation. "
             "SmolLM2 scoring a model adapted from SmolLM2 (or itself) is biased in its favour; Gemma-3 shares no "
             "weights with any model here.", ""]
    head = ["model", "kind", "parameters", "lowercase", "nats/token", "nats/word", "bits/byte", "T", "block",
            "commits", "tokens/call", "calls"]
    for s in scorers:
        head += [f"gen PPL {s}", f"real text {s}"]
    head += ["distinct-2", "real distinct-2", "repetition-2", "doubled"] + [f"words/s b{b}" for b in batches]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lk, ref = r.get("likelihood", {}), r["reference"]
        name = f"**{r['checkpoint']}**" if r.get("headline") else r["checkpoint"]
        cells = [name, r["kind"], f"{r['parameters'] / 1e6:.1f}M", "yes" if r["lowercase"] else "no",
                 f(lk.get("nats_per_token"), ".3f") + (f" ± {lk['stderr']:.3f}" if lk else ""),
                 f(lk.get("nats_per_word"), ".3f"), f(lk.get("bits_per_byte"), ".3f"), f"{r['temperature']:g}",
                 str(r["block_length"]), r["commit"],
                 f(r["tokens_per_call"], ".1f"), str(r["nfe"])]
        for s in scorers:
            cells += [f(r["gen_ppl"][s], ".1f"), f(ref["gen_ppl"][s], ".1f")]
        cells += [f(r["distinct_2"], ".3f"), f(ref["distinct_2"], ".3f"), f(r["repetition_2"], ".3f"),
                  f(r.get("doubled"), ".4f")]
        cells += [f(r.get(f"words_per_s_b{b}"), ".1f") for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    if any(tops.values()):
        lines += ["", "**Bold**: the headline setting of a swept model — at least 2 tokens per call, distinct-2 at least "
                  f"0.9x its real text's, then the lowest gen PPL under {independent} (else the most diverse setting)."]
    for checkpoint, top in tops.items():
        ar = causal_counterpart(rows, top)
        if top is not None and ar is not None and independent:
            lines.append(f"{checkpoint} at block {top['block_length']}, {top['tokens_per_call']:.1f} tokens per call, "
                         f"T {top['temperature']:g}: gen PPL "
                         f"{top['gen_ppl'][independent] / ar['gen_ppl'][independent]:.2f}x {ar['checkpoint']}'s at "
                         f"T {ar['temperature']:g} under "
                         f"{independent}, distinct-2 {top['distinct_2'] / top['reference']['distinct_2']:.2f}x real text's, "
                         f"{top[f'words_per_s_b{batches[0]}'] / ar[f'words_per_s_b{batches[0]}']:.2f}x its words/s at "
                         f"batch {batches[0]} and "
                         f"{top[f'words_per_s_b{batches[-1]}'] / ar[f'words_per_s_b{batches[-1]}']:.2f}x at batch {batches[-1]}.")
    lines += ["", "Samples (the first prompt, every row):", ""]
    lines += [f"- **{r['checkpoint']}** (block {r['block_length']}, {r['tokens_per_call']:.1f}/call, T {r['temperature']:g}): "
              f"{r['example'][:400]}"
              for r in rows]
    for checkpoint, top in tops.items():
        if top is not None:
            lines += ["", f"The first 10 samples of {checkpoint}'s headline setting, unselected:", ""]
            lines += [f"{i + 1}. {t}" for i, t in enumerate(top["samples"][:10])]
    lines += ["", "Prompts:", ""] + [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
