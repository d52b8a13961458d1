"""`textdiffusion classify`: label probabilities of a text, or the accuracy on a labelled split, from a
class-conditional checkpoint (``train --label-column``; diffusion or the AR baseline).

    textdiffusion classify --checkpoint runs/austen-book --text "It is a truth universally acknowledged ..."
    textdiffusion classify --checkpoint runs/austen-book --dataset austen --limit 200 --output preds.jsonl

The model is used as a generative classifier (classify.py): p(label | text) = softmax over labels of
-(bound on -log p(text | label)), every label scored with the same mask draws.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from textdiffusion.errors import UsageError, require_writable


@dataclass
class ClassifyArgs:
    checkpoint: str = field(default="", metadata={"help": "A checkpoint trained with --label-column (diffusion or ar)."})
    text: Optional[str] = field(default=None, metadata={"help": "One text to classify."})
    dataset: Optional[str] = field(default=None, metadata={"help": "Classify a labelled split of this corpus instead (same sources as train --dataset)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "The column with the true labels (default: the one the model was trained on)."})
    text_column: str = field(default="text", metadata={"help": "Column/field that holds the text."})
    split: str = field(default="validation", metadata={"help": "train or validation (the same split as training)."})
    validation_fraction: float = field(default=0.05, metadata={"help": "As in training (the split must match)."})
    limit: int = field(default=200, metadata={"help": "Classify N texts spread evenly over the split (0: all)."})
    method: str = field(default="nelbo", metadata={
        "help": "nelbo: the bound of the text under every label (Bayes; an AR model's exact NLL); label-slot: one "
                "pass reading the label the model predicts at its slot (a model trained with --label-target)."})
    samples: int = field(default=8, metadata={"help": "NELBO mask draws per text (shared by all labels); ignored for ar."})
    estimator: str = field(default="exact-k", metadata={"help": "NELBO estimator: exact-k or continuous."})
    batch_size: int = field(default=64, metadata={"help": "Rows (text x label x draw) per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the mask draws."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto."})
    output: Optional[str] = field(default=None, metadata={"help": "Write one JSON line per text (probabilities, bounds) here."})

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise UsageError("--checkpoint is required: a model trained with --label-column.")
        if (self.text is None) == (self.dataset is None):
            raise UsageError("give --text or --dataset (one of them).")
        if self.text is not None and not self.text.strip():
            raise UsageError(f"--text is empty ({self.text!r}): there is nothing to classify.")
        if self.split not in ("train", "validation"):
            raise UsageError(f"--split must be train or validation, got {self.split!r}.")
        for name in ("samples", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.limit < 0:
            raise UsageError(f"--limit must be >= 0, got {self.limit}.")
        if self.method not in ("nelbo", "label-slot"):
            raise UsageError(f"--method must be nelbo or label-slot, got {self.method!r}.")
        if self.estimator not in ("exact-k", "continuous"):
            raise UsageError(f"--estimator must be exact-k or continuous, got {self.estimator!r}.")
        require_writable("--output", self.output)


def run_classify(args: ClassifyArgs) -> dict:
    import numpy as np

    from textdiffusion.core.data import load_corpus
    from textdiffusion.core.labels import check_labels
    from textdiffusion.pipelines.classification import (
        check_texts,
        classification_metrics,
        format_probabilities,
        load_scorer,
    )
    from textdiffusion.pipelines.generation import resolve_device

    device = resolve_device(args.device)
    scorer = load_scorer(args.checkpoint, device)
    truth = None
    if args.text is not None:
        texts = [args.text]
    else:
        column = args.label_column or scorer.config.label_column
        corpus = load_corpus(args.dataset, args.text_column, args.validation_fraction, label_column=column)
        texts, truth = ((corpus.train, corpus.train_labels) if args.split == "train"
                        else (corpus.validation, corpus.validation_labels))
        if args.limit and args.limit < len(texts):  # evenly spaced: a split in corpus order is sorted by class
            keep = np.linspace(0, len(texts) - 1, args.limit).round().astype(int)
            texts, truth = [texts[i] for i in keep], [truth[i] for i in keep]
        check_texts(texts, "--dataset")
        check_labels(scorer.labels, corpus.label_set, f"--dataset {args.dataset!r} --label-column {column!r}: label",
                     args.checkpoint)
    t0 = time.process_time()
    if args.method == "label-slot":
        result = scorer.label_slot(texts, batch_size=args.batch_size)
    else:
        result = scorer.classify(texts, samples=args.samples, estimator=args.estimator, seed=args.seed,
                                 batch_size=args.batch_size)
    cpu = time.process_time() - t0
    probs = result.probabilities
    kind = ("the label predicted at its slot, one pass" if args.method == "label-slot" else
            "exact NLL (autoregressive)" if scorer.causal else f"NELBO, {args.samples} shared mask draws")
    report = {"checkpoint": args.checkpoint, "labels": scorer.labels, "scored_by": kind, "texts": len(texts),
              "cpu_seconds": round(cpu, 2)}
    if truth is None:
        print(f"label probabilities ({kind}; {int(result.tokens[0])} text tokens):")
        print(format_probabilities(scorer.labels, probs[0], result.bounds[0], exact=scorer.causal,
                                   slot=args.method == "label-slot"))
        report["probabilities"] = dict(zip(scorer.labels, probs[0].tolist()))
    else:
        index = {c: i for i, c in enumerate(scorer.labels)}
        metrics = classification_metrics(probs.numpy(), np.array([index[c] for c in truth]))
        print(f"{len(texts)} texts of {args.dataset!r} ({args.split}), scored by {kind}: accuracy {metrics['accuracy']:.3f}, "
              f"macro-F1 {metrics['macro_f1']:.3f}, ECE {metrics['ece']:.3f}; {cpu:.1f} CPU s")
        report["metrics"] = metrics
    if args.output:
        with Path(args.output).open("w") as f:
            for i, text in enumerate(texts):
                row = {"text": text, "prediction": result.predictions[i], "tokens": int(result.tokens[i]),
                       "probabilities": dict(zip(scorer.labels, probs[i].tolist())),
                       "bounds": dict(zip(scorer.labels, result.bounds[i].tolist()))}
                if truth is not None:
                    row["label"] = truth[i]
                f.write(json.dumps(row) + "\n")
    return report
