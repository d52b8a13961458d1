"""The baseline people would pick instead of a generative classifier: the same encoder with a
classification head (``AutoModelForSequenceClassification``), trained on the same labelled documents
for the same number of steps and batch size.

    model = train_sequence_classifier(tokenizer, "micro", texts, labels, label_set, steps=600)
    probabilities = predict_proba(model, tokenizer, texts)   # [n, C]

From scratch with the preset's ModernBERT configuration (the diffusion model's architecture, local-first
attention included), from a pretrained checkpoint's encoder with a new head (``init_from``), or of that
checkpoint's size with fresh weights (``load_weights=False``). Input is ``[cls] text [sep]``
truncated to ``max_length``, padded per batch. A plain loop (AdamW, warm-up then cosine decay): it is one
cross-entropy over a [b, C] head, nothing Trainer would add.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from textdiffusion.errors import UsageError
from textdiffusion.models.presets import build_preset_model


def build_sequence_classifier(tokenizer, preset: str | None, num_labels: int, max_length: int,
                              init_from: str | None = None, load_weights: bool = True):
    """A ModernBERT sequence classifier of ``preset``'s size for ``tokenizer``; or with ``init_from`` (a
    checkpoint folder) its encoder and a new head, or with ``load_weights=False`` only its configuration
    (the same size, fresh weights: what the pretraining gives is then the difference of the two)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, ModernBertForSequenceClassification

    if init_from is not None:
        # mean pooling as the preset classifier below; float32 weights even from an fp16 checkpoint (wiki-small)
        config = AutoConfig.from_pretrained(init_from, num_labels=num_labels, classifier_pooling="mean")
        if not load_weights:
            return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        from textdiffusion.models.loading import quiet_load_report

        with quiet_load_report():  # the MLM decoder is unused and the head is new: that is the point
            model, report = AutoModelForSequenceClassification.from_pretrained(
                init_from, config=config, dtype=torch.float32, output_loading_info=True)
        fresh = sorted(k for k in report["missing_keys"] if not k.startswith("classifier."))
        if fresh:  # the encoder itself did not load: a classifier from scratch would pass as a pretrained one
            raise UsageError(f"{init_from!r}: its encoder does not fit a sequence classifier ({len(fresh)} weights "
                             f"missing, e.g. {fresh[0]!r}).")
        return model

    config = build_preset_model(preset, tokenizer, max_length).config  # the denoiser's exact configuration
    config.num_labels = num_labels
    config.classifier_pooling = "mean"
    return ModernBertForSequenceClassification(config)


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def train_sequence_classifier(tokenizer, preset: str, texts: Sequence[str], labels: Sequence[str],
                              label_set: Sequence[str], steps: int, batch_size: int = 16, learning_rate: float = 2e-3,
                              max_length: int = 128, seed: int = 0, warmup: float = 0.05, weight_decay: float = 0.01,
                              init_from: str | None = None, load_weights: bool = True):
    """Train on (texts, labels) for ``steps`` optimiser steps of ``batch_size`` documents; returns the model.
    ``init_from``, ``load_weights``: as :func:`build_sequence_classifier`."""
    if len(set(labels)) < 2:
        raise UsageError(f"the discriminative baseline needs at least two classes, got {sorted(set(labels))!r}.")
    index = {c: i for i, c in enumerate(label_set)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise UsageError(f"label {unknown[0]!r} is not in the label set {list(label_set)!r}.")
    torch.manual_seed(seed)
    model = build_sequence_classifier(tokenizer, preset, len(label_set), max_length, init_from, load_weights)
    targets = torch.tensor([index[c] for c in labels])  # [n]

    def inputs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _encode(tokenizer, [texts[i] for i in rows.tolist()], max_length)
        return batch["input_ids"], batch["attention_mask"]

    fit_classifier(model, inputs, targets, steps, batch_size, learning_rate, weight_decay,
                   warmup_steps=max(1, int(warmup * steps)), seed=seed)
    return model.eval()


def fit_classifier(model, inputs, targets: torch.Tensor, steps: int, batch_size: int, learning_rate: float,
                   weight_decay: float, warmup_steps: int, seed: int, log=None) -> None:
    """The loop of every sequence classifier here (the discriminative baseline, the guide of noised text):
    AdamW, linear warm-up then cosine decay, batches of ``batch_size`` rows of ``targets`` [n] in a seeded
    order reshuffled at each epoch; ``inputs(rows)`` gives (input_ids, attention_mask) of those rows; ``log``
    (a ``logging.Logger``) hears the loss ten times."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warm = warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))))
    g = torch.Generator().manual_seed(seed)
    order, position, t0 = torch.randperm(len(targets), generator=g), 0, time.perf_counter()
    for step in range(steps):
        if position + batch_size > len(order):  # a new epoch, reshuffled
            order, position = torch.randperm(len(targets), generator=g), 0
        rows = order[position:position + batch_size]
        position += batch_size
        input_ids, attention_mask = inputs(rows)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [b, C]
        loss = F.cross_entropy(logits, targets[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log.info("step %d/%d  loss %.4f  %.1f s", step + 1, steps, loss.item(), time.perf_counter() - t0)


@torch.inference_mode()
def predict_proba(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 64) -> torch.Tensor:
    """[n, C] class probabilities of ``texts``."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = _encode(tokenizer, texts[start:start + batch_size], max_length)
        out.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().softmax(-1))
    return torch.cat(out)
