"""Has a labelled model learned its label? The NELBO of each validation text under its true label against
a wrong one, per class, with the classification those same bounds give.

    python benchmarks/label_gap.py --checkpoint runs/wiki-small-topics            # wiki-vital `topic`
    python benchmarks/label_gap.py --checkpoint runs/austen-book --dataset austen --label-column book

A model that ignores its label scores a text the same under every label: the gap (mean over the wrong
labels of the bound, minus the bound under the true one, nats per text token) is zero up to noise. The
bounds of one text under all labels share their mask draws (``pipelines.classification``), so the gap is
a paired difference; its standard error is over the texts of a class. Writes results.md and results.json
into --out (default benchmarks/results/label_gap/<checkpoint name>).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from textdiffusion.core.data import load_corpus
from textdiffusion.pipelines.classification import classification_metrics, load_scorer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", default="wiki-vital")
    ap.add_argument("--label-column", default="topic")
    ap.add_argument("--per-class", type=int, default=40, help="Validation texts per class (fewer if a class has fewer).")
    ap.add_argument("--samples", type=int, default=4, help="NELBO mask draws per text, shared by all labels.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    scorer = load_scorer(args.checkpoint)
    labels = scorer.labels
    corpus = load_corpus(args.dataset, label_column=args.label_column)
    texts, truth = [], []
    for c, label in enumerate(labels):
        mine = [t for t, lab in zip(corpus.validation, corpus.validation_labels) if lab == label][: args.per_class]
        texts += mine
        truth += [c] * len(mine)
    if not texts:
        sys.exit(f"error: no validation text of {args.dataset!r} carries one of the model's labels {labels}.")
    started = time.time()
    result = scorer.classify(texts, samples=args.samples, seed=args.seed)
    per_token = result.bounds / result.tokens[:, None].double()  # [n, C] nats per text token
    truth_t = torch.tensor(truth)
    true_bound = per_token[torch.arange(len(texts)), truth_t]  # [n]
    wrong = torch.ones_like(per_token, dtype=torch.bool)
    wrong[torch.arange(len(texts)), truth_t] = False
    gap = (per_token * wrong).sum(1) / wrong.sum(1) - true_bound  # [n] mean wrong label minus true label

    rows = []
    for c, label in enumerate(labels):
        g = gap[truth_t == c]
        if len(g) == 0:
            continue
        se = float(g.std() / math.sqrt(len(g))) if len(g) > 1 else float("nan")
        acc = float((per_token[truth_t == c].argmin(1) == c).double().mean())
        rows.append({"label": label, "texts": len(g), "true_bound": float(true_bound[truth_t == c].mean()),
                     "gap": float(g.mean()), "stderr": se, "recall": acc})
    overall_se = float(gap.std() / math.sqrt(len(gap)))
    metrics = classification_metrics(result.probabilities.numpy(), truth_t.numpy())
    summary = {"checkpoint": args.checkpoint, "dataset": args.dataset, "label_column": args.label_column,
               "samples": args.samples, "texts": len(texts), "gap": float(gap.mean()), "gap_stderr": overall_se,
               "classification": metrics, "per_class": rows, "seconds": time.time() - started,
               "command": "python benchmarks/label_gap.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d")}

    lines = [f"# Does `{Path(args.checkpoint).name}` use its label?", "",
             f"`{summary['command']}` ({summary['machine']}, {summary['date']}): {len(texts)} validation texts of "
             f"`{args.dataset}` (up to {args.per_class} per `{args.label_column}`), each scored by its NELBO under "
             f"every label with the same {args.samples} mask draws. Gap = mean bound under the wrong labels minus the "
             "bound under the true one (nats per text token; 0 for a model that ignores its label); its standard "
             "error is over the texts of the class.", "",
             "| class | texts | bound, true label | gap (wrong − true) | gap / s.e. | recall |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['texts']} | {r['true_bound']:.3f} | {r['gap']:+.4f} ± {r['stderr']:.4f} | "
                     f"{r['gap'] / r['stderr']:.1f} | {r['recall']:.2f} |")
    lines += [f"| **all** | {len(texts)} | {float(true_bound.mean()):.3f} | {summary['gap']:+.4f} ± {overall_se:.4f} | "
              f"{summary['gap'] / overall_se:.1f} | {metrics['accuracy']:.2f} |", "",
              f"Classification by the same bounds (uniform prior): accuracy {metrics['accuracy']:.3f}, macro-F1 "
              f"{metrics['macro_f1']:.3f}, ECE {metrics['ece']:.3f} (chance {1 / len(labels):.3f})."]
    out = Path(args.out or f"benchmarks/results/label_gap/{Path(args.checkpoint).name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    print(f"results: {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
