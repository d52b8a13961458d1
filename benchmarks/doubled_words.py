"""Recount the doubled-word rate of saved comparison samples: the share of adjacent word pairs that are one word
twice ("has has"), an error diffusion samples show and left-to-right models rarely do.

    python benchmarks/doubled_words.py benchmarks/results/pretrained_compare-smollm2*/results.json

Reads the samples every `pretrained_compare.py` run saves (prompt, then the model's text) and counts on the model's
part only, in the units that script counts diversity in (lowercased words and punctuation): runs made before the
script reported ``doubled`` itself get the same number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrained_compare import words  # noqa: E402

from textdiffusion.core.metrics import doubled_rate  # noqa: E402


def recount(results: dict) -> list[dict]:
    """One line per row: the model, its setting and the doubled rate of its samples' continuations."""
    prompts = results["meta"]["prompts"]
    out = []
    for r in results["rows"]:
        continuations = [words(sample)[len(words(prompt)):] for sample, prompt in zip(r["samples"], prompts)]
        out.append({"model": r["checkpoint"], "T": r.get("temperature", 1.0), "block": r["block_length"],
                    "commits": r.get("commit", f"{r['tokens_per_call']:g}/call"), "doubled": doubled_rate(continuations),
                    "pairs": sum(max(len(c) - 1, 0) for c in continuations)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json files of benchmarks/pretrained_compare.py")
    args = ap.parse_args(argv)
    print("| run | model | T | block | commits | doubled | adjacent pairs |\n| --- | --- | --- | --- | --- | --- | --- |")
    for path in args.results:
        if not Path(path).is_file():
            ap.error(f"results {path!r} is not a file")
        for row in recount(json.loads(Path(path).read_text())):
            print(f"| {Path(path).parent.name} | {row['model']} | {row['T']:g} | {row['block']} | {row['commits']} | "
                  f"{row['doubled']:.4f} | {row['pairs']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
