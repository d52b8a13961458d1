"""Diffusion models with different tokenizers, side by side in units that do not depend on the tokenizer.

    OMP_NUM_THREADS=2 python benchmarks/pretrained_compare.py --checkpoints wiki-small runs/mpnet-wiki
    python benchmarks/pretrained_compare.py --quick      # seconds; what the test suite runs

wiki-small (byte-level BPE of 4k, cased) and a fine-tuned mpnet-base (WordPiece of 30k, lowercase) cannot be
compared per token: a WordPiece token carries more text, and a lowercase model never writes a capital. So
every number here is per word, per byte or on the same text:

* **likelihood** — `textdiffusion eval` on validation blocks of each model's own tokenizer: NELBO in nats
  per token, nats per word and bits per byte (the same bound divided by the words / UTF-8 bytes of the text);
* **generation** — both models continue the same prompts (the first --prompt-words words of validation
  documents) by about --new-words words: each gets ``round(new_words / words_per_token)`` masks, its own
  words-per-token measured on the validation split, and the same sampler settings (blocks of 32, 4 tokens
  per step, top-k 50, repetition penalty 1.1, dual cache). Gen PPL under the scorer (SmolLM2-135M) is given
  as generated and **lowercased** (prompt and continuation: what a lowercase model is judged by fairly), and
  each model has its own reference row: the documents' real next words, passed through its tokenizer and back
  (so MPNet's reference is lowercase too). Diversity (distinct-2, repetition-2) is on lowercased words and
  punctuation of the text, not on token ids;
* **speed** — words of generated text per second at batch 1 (the first prompt) and batch 16, best of
  --repeats after a warm-up; process CPU time at one thread, wall clock at more (then use an idle machine).

Writes results.json and README.md to --out.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import best_of, timed  # noqa: E402

from textdiffusion.core.detokenize import decode_text
from textdiffusion.core.metrics import distinct_n, repetition_rate
from textdiffusion.models.quality import PromptSet, diffusion_continuations
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


def likelihood(checkpoint: str, blocks: int, out: Path, python: str) -> dict:
    """`textdiffusion eval` in a subprocess (as a user runs it): the first NELBO row of its eval.json."""
    where = out / "eval" / Path(checkpoint).name
    cmd = [python, "-m", "textdiffusion", "eval", "--checkpoint", checkpoint, "--max-length", "128",
           "--eval-blocks", str(blocks), "--samples-per-block", "2", "--batch-size", "8", "--device", "cpu",
           "--output-dir", str(where), "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((where / "eval.json").read_text())["nelbo"][0]


def generation(gen: DiffusionGenerator, prompts: list[str], references: list[str], new_words: int, scorer,
               repeats: int, batches: list[int], sampler: dict, docs) -> tuple[dict, dict]:
    """(the model's row, its real-text reference row); ``docs``: validation texts to measure words per token on."""
    wpt = words_per_token(gen.tokenizer, docs[:200])
    new_tokens = max(1, round(new_words / wpt))
    ids = [gen.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    own_prompts = [decode_text(gen.tokenizer, i) for i in ids]  # as the model sees them (lowercased by MPNet)
    steps = sampler["steps_per_block"] * math.ceil(new_tokens / sampler["block_length"])
    settings = dict(block_length=sampler["block_length"], steps=steps, sampling="topk", top_k=50,
                    temperature=sampler["temperature"],
                    repetition_penalty=sampler["repetition_penalty"], strategy="confidence", cache="dual",
                    max_length=max(map(len, ids)) + new_tokens + 2)
    full = PromptSet(prompts=own_prompts, prompt_ids=ids, references=[])
    out = diffusion_continuations(gen, full, new_tokens, **settings)
    texts = [decode_text(gen.tokenizer, i) for i in out.new_ids]
    row = {"new_tokens": new_tokens, "words_per_token": wpt, "steps": steps, "nfe": out.nfe}
    for b in batches:
        part = PromptSet(prompts=own_prompts[:b], prompt_ids=ids[:b], references=[])
        run = lambda: diffusion_continuations(gen, part, new_tokens, **settings)  # noqa: E731
        if repeats < 1:
            seconds = float("nan")
        else:  # the full batch was warmed up by the scored run above
            seconds = best_of(run, repeats) if b == len(prompts) else timed(run, repeats)
        row[f"words_per_s_b{b}"] = sum(len(t.split()) for t in texts[:b]) / seconds
    row.update(judge(own_prompts, texts, scorer))
    row["example"] = (own_prompts[0] + " " + texts[0].strip()).replace("\n", " ")
    round_trip = [decode_text(gen.tokenizer, gen.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
    return row, judge(own_prompts, round_trip, scorer)


def judge(prompts: list[str], texts: list[str], scorer) -> dict:
    w = [words(t) for t in texts]
    row = {"words": sum(map(len, w)) / len(w), "distinct_2": distinct_n(w, 2), "repetition_2": repetition_rate(w, 2)}
    if scorer is None:
        row.update(gen_ppl=float("nan"), gen_ppl_lower=float("nan"))
    else:
        row["gen_ppl"] = scorer.perplexity(prompts, [" " + t.strip() for t in texts])
        row["gen_ppl_lower"] = scorer.perplexity([p.lower() for p in prompts], [" " + t.strip().lower() for t in texts])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=["wiki-small", "runs/mpnet-wiki"])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--new-words", type=int, default=56)
    ap.add_argument("--eval-blocks", type=int, default=64, help="validation blocks for the likelihood (0: skip it)")
    ap.add_argument("--steps-per-block", type=int, default=8, help="denoising steps per block of 32 (4 tokens a step)")
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (0: no timing)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--scorer", default="smollm2", help="gen-PPL scorer: smollm2, gemma3, a causal LM ('none' to skip)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no scorer, no eval: for the test suite")
    ap.add_argument("--out", default="benchmarks/results/pretrained_compare")
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.new_words, args.eval_blocks, args.scorer, args.repeats = 2, 8, 0, "none", 1
    torch.set_num_threads(args.threads)
    from textdiffusion.core.data import load_corpus

    validation = load_corpus("wiki-vital").validation
    prompts, references = word_prompts(validation, args.num_prompts, args.prompt_words, args.new_words)
    scorer = None
    if args.scorer != "none":
        from textdiffusion.models.quality import Scorer

        scorer = Scorer.load(args.scorer)
    sampler = dict(block_length=32, steps_per_block=args.steps_per_block, repetition_penalty=args.repetition_penalty,
                   temperature=args.temperature)
    batches = sorted({1, args.num_prompts})
    rows = []
    for checkpoint in args.checkpoints:
        gen = DiffusionGenerator.from_pretrained(checkpoint, device="cpu")
        params = sum(p.numel() for p in gen.model.parameters())
        row, reference = generation(gen, prompts, references, args.new_words, scorer, args.repeats, batches, sampler,
                                    validation)
        row.update(checkpoint=checkpoint, parameters=params, reference=reference,
                   lowercase=bool(getattr(gen.tokenizer, "do_lower_case", False)
                                  or gen.tokenizer("A", add_special_tokens=False)["input_ids"]
                                  == gen.tokenizer("a", add_special_tokens=False)["input_ids"]))
        if args.eval_blocks:
            row["likelihood"] = likelihood(checkpoint, args.eval_blocks, Path(args.out), sys.executable)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "example"}), flush=True)
        del gen
    write(args, rows, batches)


def write(args, rows: list[dict], batches: list[int]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} thread(s), timed by "
                       f"{'process CPU time' if args.threads == 1 else 'wall clock'}, fp32"}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    def f(v, spec):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['date']}", "",
             f"Prompts: the first {args.prompt_words} words of {args.num_prompts} wiki-vital validation documents; about "
             f"{args.new_words} words generated per prompt (blocks of 32, {args.steps_per_block} steps per block, top-k 50, "
             f"temperature {args.temperature}, "
             f"repetition penalty {args.repetition_penalty}, dual cache). Gen PPL under {args.scorer}; distinct-2 and "
             "repetition-2 on lowercased words.", "",
             "| model | parameters | lowercase | nats/token | nats/word | bits/byte | new tokens | calls | gen PPL | "
             "gen PPL lowercased | its real text, lowercased | distinct-2 | real distinct-2 | repetition-2 | "
             + " | ".join(f"words/s b{b}" for b in batches) + " |",
             "|" + " --- |" * (14 + len(batches))]
    for r in rows:
        lk, ref = r.get("likelihood", {}), r["reference"]
        cells = [r["checkpoint"], f"{r['parameters'] / 1e6:.1f}M", "yes" if r["lowercase"] else "no",
                 f(lk.get("nats_per_token"), ".3f") + (f" ± {lk['stderr']:.3f}" if lk else ""),
                 f(lk.get("nats_per_word"), ".3f"), f(lk.get("bits_per_byte"), ".3f"), str(r["new_tokens"]), str(r["nfe"]),
                 f(r["gen_ppl"], ".1f"), f(r["gen_ppl_lower"], ".1f"), f(ref["gen_ppl_lower"], ".1f"),
                 f(r["distinct_2"], ".3f"), f(ref["distinct_2"], ".3f"), f(r["repetition_2"], ".3f")]
        cells += [f(r.get(f"words_per_s_b{b}"), ".1f") for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Samples (the first prompt):", ""] + [f"- **{r['checkpoint']}**: {r['example'][:400]}" for r in rows]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
