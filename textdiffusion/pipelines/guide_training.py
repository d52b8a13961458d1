"""`textdiffusion train-guide`: train the guide of classifier guidance beside a diffusion checkpoint.

    textdiffusion train-guide --checkpoint wiki-small-topics --dataset topics.jsonl --label-column topic \\
        --output-dir runs/topics-guide
    textdiffusion generate --checkpoint wiki-small-topics --label rivers --guidance classifier --guide runs/topics-guide

The guide (``models/guide.py``: a small preset encoder with the checkpoint's tokenizer) learns p(y | x_t)
from labelled documents laid out as the checkpoint's rows (``[cls] (label slot) text [sep] [sep]...``, one
document per block) and noised by the project's collator at a random level per example (continuous time,
end-of-text maskable as at generation), so it can judge a row at every step of a denoising run. A plain
loop (AdamW, warm-up then cosine decay): one cross-entropy over a [b, C] head. At the end it reports the
validation accuracy at fixed masked fractions (0% to 100%), which should rise as more text is visible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.collator import collator_for_tokenizer
from textdiffusion.core.data import load_corpus
from textdiffusion.core.labels import LABEL_PREFIX_LENGTH, pack_labelled
from textdiffusion.errors import UsageError, require_writable
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.models.discriminative import build_sequence_classifier, fit_classifier
from textdiffusion.models.guide import GuideInfo, NoisyClassifier, accuracy_table
from textdiffusion.models.presets import PRESETS

logger = logging.getLogger("textdiffusion.train_guide")

EVAL_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)  # masked fractions the validation accuracy is reported at


@dataclass
class GuideArgs:
    """The flags of `textdiffusion train-guide`."""

    checkpoint: str = field(default="wiki-small", metadata={
        "help": "The diffusion checkpoint the guide will steer: its tokenizer and row layout are the guide's."})
    dataset: str = field(default="", metadata={"help": "Labelled documents: a bundled corpus, a local file or a hub id."})
    label_column: str = field(default="", metadata={"help": "The column holding each document's label."})
    text_column: str = field(default="text", metadata={"help": "The column holding each document's text."})
    exclude_labels: list[str] = field(default_factory=list, metadata={
        "help": "Drop the documents of these classes (e.g. Uncategorized). On a labelled checkpoint the classes it "
                "was not trained with are dropped anyway: the guide steers toward the checkpoint's labels."})
    output_dir: str = field(default="runs/guide", metadata={"help": "Where the guide is saved."})
    preset: str = field(default="micro", metadata={"help": f"The guide's size: {sorted(PRESETS)} (micro: seconds on a CPU)."})
    steps: int = field(default=600, metadata={"help": "Optimiser steps."})
    batch_size: int = field(default=32, metadata={"help": "Blocks per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    max_length: int = field(default=0, metadata={"help": "Tokens per block (0: the checkpoint's training length)."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Documents held out to report accuracy on."})
    seed: int = field(default=0, metadata={"help": "Initialisation, batch order and the masks drawn."})

    def __post_init__(self) -> None:
        if not self.dataset:
            raise UsageError("--dataset is required: the labelled documents the guide learns from.")
        if not self.label_column:
            raise UsageError("--label-column is required: the column that holds each document's label.")
        if self.preset not in PRESETS:
            raise UsageError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size)):
            if value < 1:
                raise UsageError(f"{flag} must be >= 1, got {value}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"--learning-rate must be > 0, got {self.learning_rate}.")
        if self.max_length < 0:
            raise UsageError(f"--max-length must be >= 0, got {self.max_length}.")
        require_writable("--output-dir", self.output_dir, directory=True)


def guide_blocks(texts: Sequence[str], tokenizer, max_length: int, label_slot: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's row layout of each document: ``[cls] <mask> text [sep]...`` for a labelled checkpoint
    (the guide sees the mask where the denoiser's row has its label), ``[cls] text [sep]...`` otherwise.
    Returns blocks [m, max_length] and the document each came from [m]."""
    length = max_length if label_slot else max_length + 1
    blocks, owner = pack_labelled(texts, [None] * len(texts), tokenizer, length, tokenizer.mask_token_id)
    if not label_slot:
        blocks = torch.cat([blocks[:, :1], blocks[:, 2:]], 1)  # drop the label slot
    return blocks, owner


def noised(collator, blocks: torch.Tensor, level: float | None, g: torch.Generator | None = None) -> torch.Tensor:
    """``blocks`` masked by the collator (a random level per example) or at a fixed ``level``."""
    if level is None:
        return collator(list(blocks))["input_ids"]
    maskable = collator.maskable(blocks, torch.full((blocks.shape[0],), collator.prefix_length))
    return blocks.masked_fill(maskable & (torch.rand(blocks.shape, generator=g) < level), collator.mask_token_id)


def train_guide(tokenizer, config: DiffusionConfig, texts: Sequence[str], labels: Sequence[str], label_set: Sequence[str],
                *, preset: str = "micro", steps: int = 600, batch_size: int = 32, learning_rate: float = 2e-3,
                max_length: int | None = None, seed: int = 0, checkpoint: str = "?",
                validation: tuple[Sequence[str], Sequence[str]] | None = None) -> NoisyClassifier:
    """Train a guide on (texts, labels) as the rows of a checkpoint with ``config`` look at every masking level."""
    if len(set(labels)) < 2:
        raise UsageError(f"a guide needs at least two classes, got {sorted(set(labels))!r}.")
    max_length = max_length or config.max_length
    label_slot = bool(config.labels)
    index = {c: i for i, c in enumerate(label_set)}
    blocks, owner = guide_blocks(texts, tokenizer, max_length, label_slot)  # [m, l], [m]
    targets = torch.tensor([index[labels[i]] for i in owner.tolist()])  # [m]
    prefix = LABEL_PREFIX_LENGTH if label_slot else 1
    collator = collator_for_tokenizer(tokenizer, learn_eos=True, time_sampling="uniform", prefix_length=prefix, seed=seed)
    torch.manual_seed(seed)
    model = build_sequence_classifier(tokenizer, preset, len(label_set), max_length)
    pad = tokenizer.pad_token_id

    def inputs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noised(collator, blocks[rows], None), (blocks[rows] != pad).long()  # a random level per example

    fit_classifier(model, inputs, targets, steps, batch_size, learning_rate, weight_decay=0.01,
                   warmup_steps=max(1, steps // 20), seed=seed, log=logger)
    info = GuideInfo(labels=list(label_set), label_slot=label_slot, max_length=max_length, checkpoint=checkpoint,
                     preset=preset)
    guide = NoisyClassifier(model.eval(), tokenizer, info, checkpoint)
    if validation is not None and len(validation[0]):
        accuracy = level_accuracy(guide, collator, validation[0], validation[1], seed=seed)
        info.accuracy = {f"{level:g}": acc for level, acc in zip(EVAL_LEVELS, accuracy)}
    return guide


def level_accuracy(guide: NoisyClassifier, collator, texts: Sequence[str], labels: Sequence[str],
                   levels: Sequence[float] = EVAL_LEVELS, seed: int = 0) -> list[float]:
    """Accuracy of ``guide`` on ``texts`` (their first block) masked at each fraction of ``levels``."""
    blocks, owner = guide_blocks(texts, guide.tokenizer, guide.info.max_length, guide.info.label_slot)
    first = torch.ones(len(owner), dtype=torch.bool)
    first[1:] = owner[1:] != owner[:-1]  # one block per document: its opening
    blocks, owner = blocks[first], owner[first]
    truth = torch.tensor([guide.labels.index(labels[i]) for i in owner.tolist()])
    attention = (blocks != guide.tokenizer.pad_token_id).long()
    out = []
    for level in levels:
        g = torch.Generator().manual_seed(seed + 1)
        predicted = guide.log_probs(noised(collator, blocks, level, g), attention).argmax(1).cpu()
        out.append(float((predicted == truth).float().mean()))
    return out


def run_train_guide(args: GuideArgs) -> NoisyClassifier:
    from transformers import AutoTokenizer

    path = resolve_checkpoint(args.checkpoint)
    if not Path(path).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint!r}: no such checkpoint folder.", field="checkpoint",
                         value=args.checkpoint)
    config = DiffusionConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.mask_token_id is None:
        raise UsageError(f"--checkpoint {args.checkpoint!r}: its tokenizer has no mask token; a guide reads masked text.")
    corpus = load_corpus(args.dataset, args.text_column, args.validation_fraction, label_column=args.label_column)
    if args.exclude_labels:
        corpus = corpus.without_labels(args.exclude_labels, "--exclude-labels")
    if config.labels:  # the guide of a labelled checkpoint learns exactly its classes
        foreign = sorted(set(corpus.label_set) - set(config.labels))
        if foreign:
            logger.info("leaving out %d class(es) %s: --checkpoint %s was not trained with them", len(foreign), foreign,
                        args.checkpoint)
            corpus = corpus.without_labels(foreign, "--checkpoint's labels")
    guide = train_guide(tokenizer, config, corpus.train, corpus.train_labels, corpus.label_set, preset=args.preset,
                        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        max_length=args.max_length or None, seed=args.seed, checkpoint=args.checkpoint,
                        validation=(corpus.validation, corpus.validation_labels))
    guide.save(args.output_dir)
    levels = [float(k) for k in guide.info.accuracy]
    print(f"guide: {args.output_dir}  labels {guide.labels}")
    print("validation accuracy  " + accuracy_table(levels, list(guide.info.accuracy.values())))
    return guide
