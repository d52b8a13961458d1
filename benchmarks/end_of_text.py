"""Does the model know where text stops? End-of-text at true document ends, and sample lengths vs real ones.

    python benchmarks/end_of_text.py                                   # wiki-small now vs before (git d41eb5a)
    python benchmarks/end_of_text.py --checkpoint runs/x --before none --samples 16

For each model: the mean probability of end-of-text at masked true document ends of the validation
blocks, and how often it is the argmax (``evaluation.end_of_text_at_document_ends``); then continuations
of the first 8 tokens of validation documents with `generate`'s defaults at 128 tokens, stopping at the
first end-of-text: the share that stop before the limit and their lengths, against the same documents'
real lengths (a histogram). Writes results.json, README.md and lengths.png into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textdiffusion.core.data import load_corpus, pack
from textdiffusion.core.evaluation import end_of_text_at_document_ends
from textdiffusion.core.sampler import continuation
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.pipelines.generation import DiffusionGenerator

BEFORE_REV = "d41eb5a"  # the last commit whose wiki-small never saw end-of-text as a target
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "diffusion_config.json")


def model_at_revision(rev: str, into: Path) -> Path:
    """The bundled model as committed at ``rev``, extracted from git into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:textdiffusion/models/wiki-small/{name}"],
                              capture_output=True, check=True).stdout
        (into / name).write_bytes(blob)
    return into


def measure(path: str, docs: list[str], samples: int, max_length: int, prompt_tokens: int) -> dict:
    gen = DiffusionGenerator.from_pretrained(path, device="cpu")
    tok = gen.tokenizer
    blocks = pack(docs, tok, max_length, keep_remainder=True)[:256]
    eos = end_of_text_at_document_ends(gen.model, blocks, gen.sep_id, gen.mask_id, tok.all_special_ids)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    ids = [x for x in ids if len(x) > prompt_tokens][:samples]
    prompts = [tok.decode(x[:prompt_tokens]) for x in ids]
    room = max_length - 2 - prompt_tokens
    t0 = time.perf_counter()
    out = gen.generate(prompts, max_length=max_length, seed=0)
    seconds = time.perf_counter() - t0
    _, editable, _ = gen.build_batch([gen.prompt_template(p, max_length) for p in prompts], max_length)
    tail = continuation(editable)
    ended = (out.token_ids == gen.sep_id) & tail  # [b, l]
    first = torch.where(ended.any(1), ended.float().argmax(1), -1)
    starts = tail.float().argmax(1)
    lengths = torch.where(first >= 0, first - starts, tail.sum(1)).tolist()
    real = [min(len(x) - prompt_tokens, room) for x in ids]
    return {"checkpoint": path, "eos_probability_at_document_ends": eos.mean_probability,
            "eos_argmax_rate_at_document_ends": eos.argmax_rate, "document_ends": eos.document_ends,
            "samples": len(prompts), "stopped_before_limit": sum(f >= 0 for f in first.tolist()) / len(prompts),
            "lengths": lengths, "model_calls": out.nfe, "seconds": round(seconds, 2),
            "real_stopped_before_limit": sum(r < room for r in real) / len(real), "real_lengths": real,
            "room": room, "example": out.texts[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="wiki-small")
    p.add_argument("--before", default="git", help="'git' (wiki-small at %s), a path, or 'none'" % BEFORE_REV)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "end_of_text"))
    args = p.parse_args()
    torch.manual_seed(0)
    docs = load_corpus("wiki-vital").validation
    models = {"now": resolve_checkpoint(args.checkpoint)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before == "git":
            models = {"before": str(model_at_revision(BEFORE_REV, Path(tmp) / "before")), **models}
        elif args.before != "none":
            models = {"before": resolve_checkpoint(args.before), **models}
        results = {name: measure(path, docs, args.samples, args.max_length, args.prompt_tokens)
                   for name, path in models.items()}
    if args.before == "git":
        results["before"]["checkpoint"] = f"wiki-small at {BEFORE_REV} (end-of-text never a target)"
    results["now"]["checkpoint"] = args.checkpoint
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
            "torch": torch.__version__, "command": "python benchmarks/end_of_text.py " + " ".join(sys.argv[1:])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    room = next(iter(results.values()))["room"]
    bins = list(range(0, room + 9, 8))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(next(iter(results.values()))["real_lengths"], bins=bins, alpha=0.45, label="real documents", color="grey")
    for name, r in results.items():
        ax.hist(r["lengths"], bins=bins, histtype="step", linewidth=2, label=f"samples, {name}")
    ax.set_xlabel(f"continuation length in tokens (limit {room}; at the limit = never stopped)")
    ax.set_ylabel("samples")
    ax.set_title("Where generated text stops, against the real documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=120)

    lines = ["# End-of-text", "", f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}.", "",
             "| model | p(EOS) at document ends | EOS is the argmax | samples stopping before the limit | "
             "median length (tokens) | model calls (batch) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results.values():
        med = sorted(r["lengths"])[len(r["lengths"]) // 2]
        lines.append(f"| {r['checkpoint']} | {r['eos_probability_at_document_ends']:.3g} | "
                     f"{r['eos_argmax_rate_at_document_ends']:.1%} of {r['document_ends']} | "
                     f"{r['stopped_before_limit']:.0%} of {r['samples']} | {med} | {r['model_calls']} |")
    real = next(iter(results.values()))
    lines.append(f"| real documents (same prompts) | | | {real['real_stopped_before_limit']:.0%} | "
                 f"{sorted(real['real_lengths'])[len(real['real_lengths']) // 2]} | |")
    lines += ["", "![lengths](lengths.png)", "", f"Example (now): {results['now']['example']!r}", ""]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
