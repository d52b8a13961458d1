"""Generative classification: the label under which a class-conditional model finds the text most likely.

A model trained with ``train --label-column`` models p(text | label). Bayes with a uniform prior turns it
into a classifier: p(label | text) = softmax over labels of log p(text | label). The diffusion model only
has an upper bound on -log p (the NELBO), so its probabilities are softmax(-bound); the AR baseline has
the exact likelihood. Both are in nats summed over the text's tokens (not per token: the labels compete
on the same text, and the sum is the log-likelihood).

The diffusion bound is a Monte-Carlo estimate, so the *differences* between labels are what matter. The
blocks of one text under different labels differ only in the label token (position 1, never masked), so
every label is scored with the same mask draws (``evaluation.draw_masks`` depends only on which positions
are maskable): the noise of the draw is shared and mostly cancels in the differences, as common random
numbers do. All labels of a text, and several texts, run in one batch of rows; nothing loops over labels.

    scorer = load_scorer("runs/austen-book")
    result = scorer.classify(["It is a truth universally acknowledged ..."])
    result.probabilities  # [n, C]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.denoiser import masked_logits
from textdiffusion.core.evaluation import draw_masks, masked_ce_sums
from textdiffusion.core.labels import LABEL_POSITION, LABEL_PREFIX_LENGTH, check_labels, label_token_ids, pack_labelled
from textdiffusion.errors import UsageError
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.pipelines.objectives import objective_of_checkpoint


@dataclass
class Classification:
    labels: list[str]
    bounds: torch.Tensor  # [n, C] float64: -log p(text | label) in nats (an upper bound for diffusion)
    tokens: torch.Tensor  # [n] the text tokens each bound sums over

    @property
    def probabilities(self) -> torch.Tensor:
        """[n, C] p(label | text) under a uniform prior: softmax of the negative bounds."""
        return torch.softmax(-self.bounds, dim=1)

    @property
    def predictions(self) -> list[str]:
        return [self.labels[i] for i in self.bounds.argmin(1).tolist()]


def check_texts(texts: Sequence[str], flag: str = "--text") -> None:
    empty = [i for i, t in enumerate(texts) if not t or not t.strip()]
    if not texts or empty:
        raise UsageError(f"{flag} is empty{f' (text {empty[0]})' if len(texts) > 1 else ''}: there is nothing to classify.")


class LabelScorer:
    """A class-conditional checkpoint (diffusion or AR) and how to score texts under every label."""

    def __init__(self, model, tokenizer, config: DiffusionConfig, checkpoint: str = "?"):
        check_labels(config.labels, config.labels or [], "--checkpoint", checkpoint)
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.labels = list(config.labels)
        self.label_ids = torch.tensor(label_token_ids(tokenizer, self.labels))  # [C]
        self.causal = config.objective == "ar"
        self.checkpoint = checkpoint

    def blocks(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training layout of each text (labels.pack_labelled) with the first label in place: blocks
        [m, l], the text each block belongs to [m], and the text tokens to score [m, l] bool."""
        pad_with_eos = self.causal or self.config.corruption.learn_eos
        blocks, owner = pack_labelled(texts, [int(self.label_ids[0])] * len(texts), self.tokenizer,
                                      self.config.max_length, self.tokenizer.mask_token_id, pad_with_eos)
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))
        positions = torch.arange(blocks.shape[1])[None, :]
        scored = (positions >= LABEL_PREFIX_LENGTH) & ~torch.isin(blocks, special)  # [m, l]
        return blocks, owner, scored

    def with_labels(self, blocks: torch.Tensor) -> torch.Tensor:
        """[r, l] -> [r, C, l]: each block once per label (the label token at position 1)."""
        ids = blocks[:, None, :].repeat(1, len(self.labels), 1)  # [r, C, l]
        ids[:, :, LABEL_POSITION] = self.label_ids
        return ids

    @torch.inference_mode()
    def classify(self, texts: Sequence[str], samples: int = 8, estimator: str = "exact-k", seed: int = 0,
                 batch_size: int = 64, texts_per_call: int = 16) -> Classification:
        """Bounds [n, C] for ``texts``; texts are scored ``texts_per_call`` at a time, each group with masks
        from a generator seeded by (seed, group), so a result does not depend on how many texts follow."""
        check_texts(texts)
        bounds, tokens = [], []
        for start in range(0, len(texts), texts_per_call):
            group = list(texts[start:start + texts_per_call])
            blocks, owner, scored = self.blocks(group)
            if self.causal:
                per_block = self._causal_block_nll(blocks, scored, batch_size)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + start)
                per_block = self._diffusion_block_bounds(blocks, scored, samples, estimator, g, batch_size)
            bounds.append(torch.zeros(len(group), len(self.labels), dtype=torch.float64).index_add_(0, owner, per_block))
            tokens.append(torch.zeros(len(group), dtype=torch.long).index_add_(0, owner, scored.sum(1)))
        return Classification(self.labels, torch.cat(bounds), torch.cat(tokens))

    @torch.inference_mode()
    def label_slot(self, texts: Sequence[str], batch_size: int = 64) -> Classification:
        """One pass per block instead of a NELBO per label: the label slot masked, the text whole, the model's
        own p(label | text) read at the slot (softmax over the label tokens only; a text of several blocks
        averages its blocks' log-probabilities). Needs a model trained with ``train --label-target``, which
        learned to predict the label there. ``bounds`` are then -log p(label | text)."""
        check_texts(texts)
        if self.causal or not self.config.label_target:
            raise UsageError(f"--method label-slot needs a diffusion model trained with --label-target (the label "
                             f"predicted at its slot); {self.checkpoint!r} was not: use --method nelbo.",
                             field="method", value="label-slot")
        blocks, owner, scored = self.blocks(texts)
        blocks[:, LABEL_POSITION] = self.tokenizer.mask_token_id
        at_slot = torch.zeros_like(blocks, dtype=torch.bool)
        at_slot[:, LABEL_POSITION] = True
        device = next(self.model.parameters()).device
        log_p = []
        for start in range(0, len(blocks), batch_size):
            x = blocks[start:start + batch_size].to(device)
            attention = (x != self.tokenizer.pad_token_id).long() if self.tokenizer.pad_token_id is not None else None
            logits = masked_logits(self.model, x, attention, at_slot[start:start + batch_size].to(device))  # [b, V]
            log_p.append(torch.log_softmax(logits[:, self.label_ids.to(device)].double(), dim=1).cpu())
        per_block = torch.cat(log_p)  # [m, C]
        blocks_per_text = torch.zeros(len(texts), dtype=torch.float64).index_add_(0, owner, torch.ones(len(owner),
                                                                                                     dtype=torch.float64))
        mean = torch.zeros(len(texts), len(self.labels), dtype=torch.float64).index_add_(0, owner, per_block)
        mean /= blocks_per_text[:, None]
        return Classification(self.labels, -mean,
                              torch.zeros(len(texts), dtype=torch.long).index_add_(0, owner, scored.sum(1)))

    def _diffusion_block_bounds(self, blocks, scored, samples, estimator, g, batch_size) -> torch.Tensor:
        """[m, C]: the NELBO (nats, summed over the block's text tokens) under each label, one mask draw
        per (block, sample) shared by all labels."""
        m, C = blocks.shape[0], len(self.labels)
        draws = draw_masks(scored, samples, estimator, g)  # masked [m*S, l], scale [m*S]
        ids = self.with_labels(blocks.repeat_interleave(samples, 0))  # [m*S, C, l]
        masked = draws.masked[:, None, :].expand(-1, C, -1)  # [m*S, C, l]: the same draw for every label
        attention = (ids != self.tokenizer.pad_token_id).long() if self.tokenizer.pad_token_id is not None else None
        ce = masked_ce_sums(self.model, ids.flatten(0, 1), masked.flatten(0, 1), self.tokenizer.mask_token_id,
                            batch_size, None if attention is None else attention.flatten(0, 1))  # [m*S*C]
        per_token = (ce.view(m, samples, C) * draws.scale.view(m, samples, 1)).mean(1)  # [m, C] NELBO / L
        return per_token * scored.sum(1, keepdim=True).double()  # [m, C] nats

    def _causal_block_nll(self, blocks, scored, batch_size) -> torch.Tensor:
        """[m, C]: exact NLL (nats) of each block's text tokens under each label, left to right."""
        m, C = blocks.shape[0], len(self.labels)
        last = int(scored.nonzero()[:, 1].max()) + 1 if bool(scored.any()) else 2
        ids = self.with_labels(blocks[:, :last]).flatten(0, 1)  # [m*C, l']: nothing after the last text token matters
        keep = scored[:, 1:last].repeat_interleave(C, 0)  # [m*C, l'-1] targets that count
        device = next(self.model.parameters()).device
        nll = torch.zeros(m * C, dtype=torch.float64)
        for start in range(0, m * C, batch_size):
            rows = slice(start, start + batch_size)
            x = ids[rows].to(device)
            logits = self.model(input_ids=x).logits[:, :-1].float()  # [b, l'-1, V] predicts positions 1..
            ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # [b, l'-1]
            nll[rows] = (ce * keep[rows].to(device)).sum(1).double().cpu()
        return nll.view(m, C)


def load_scorer(checkpoint: str, device: torch.device | str = "cpu") -> LabelScorer:
    """A :class:`LabelScorer` for a diffusion or AR checkpoint trained with ``--label-column``."""
    path = resolve_checkpoint(checkpoint)
    config = DiffusionConfig.from_pretrained(path)
    if config.block_size:
        raise UsageError(f"--checkpoint {checkpoint!r} is a block-diffusion model: it sees only the text before a block, "
                         "so it cannot score a label slot placed before the text (classify needs a model trained "
                         "with --label-column).", field="checkpoint", value=checkpoint)
    check_labels(config.labels, [], "--checkpoint", checkpoint)  # before the (slow) model load
    if objective_of_checkpoint(path).name == "ar":
        from textdiffusion.models.autoregressive import load_causal_lm

        tokenizer, model = load_causal_lm(path)
    else:  # the denoiser it was trained as: an adapted causal LM scores with its shifted logits
        from textdiffusion.models.loading import open_checkpoint

        opened = open_checkpoint(path)
        tokenizer, model = opened.tokenizer, opened.denoiser
    return LabelScorer(model.to(device), tokenizer, config, checkpoint)


def unigram_bayes(tokenizer, train_texts: Sequence[str], train_labels: Sequence[str], labels: Sequence[str],
                  texts: Sequence[str], smoothing: float = 0.5) -> torch.Tensor:
    """[n, C] p(label | text) of the simplest generative classifier: class-conditional token frequencies
    (add-``smoothing``), i.e. multinomial Naive Bayes on the same tokens, with a uniform prior. The floor a
    neural p(text | label) should clear: a model that has not learned to use its label stays below it."""
    index = {c: i for i, c in enumerate(labels)}
    vocab = len(tokenizer)
    train_ids = tokenizer(list(train_texts), add_special_tokens=False)["input_ids"]
    flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in train_ids])  # every training token
    cls = np.repeat([index[c] for c in train_labels], [len(r) for r in train_ids])  # its document's class
    counts = np.bincount(cls * vocab + flat, minlength=len(labels) * vocab).reshape(len(labels), vocab) + smoothing
    log_p = np.log(counts / counts.sum(1, keepdims=True))  # [C, V]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in ids])
    owner = np.repeat(np.arange(len(ids)), [len(r) for r in ids])
    scores = np.zeros((len(ids), len(labels)))
    np.add.at(scores, owner, log_p[:, flat].T)  # [n, C] log p(text | label)
    return torch.softmax(torch.from_numpy(scores), dim=1)


# -- how good a classifier is -----------------------------------------------------------------------
def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """ECE: |accuracy - confidence| of the top label, averaged over equal-width confidence bins by size."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):  # ten bins: not a hot path
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """[C, C] counts: row = true class, column = predicted class."""
    return np.bincount(truth * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def macro_f1(confusion: np.ndarray) -> float:
    """The unweighted mean over classes of F1 (a class never predicted and never present is skipped)."""
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    present = (predicted + actual) > 0
    f1 = np.where(present, 2 * tp / np.maximum(predicted + actual, 1), 0.0)
    return float(f1[present].mean()) if present.any() else float("nan")


def per_class_recall(confusion: np.ndarray) -> list[float | None]:
    """[C] the share of each class's texts predicted as it (None for a class with no texts): where a classifier
    that looks good on average gives up on the small classes."""
    actual = confusion.sum(1)
    return [float(tp / n) if n else None for tp, n in zip(np.diag(confusion).tolist(), actual.tolist())]


def classification_metrics(probabilities: np.ndarray, truth: np.ndarray) -> dict:
    """Accuracy, macro-F1, ECE, recall per class and the confusion matrix of ``probabilities`` [n, C]
    against ``truth`` [n]."""
    predicted = probabilities.argmax(1)
    confusion = confusion_matrix(truth, predicted, probabilities.shape[1])
    return {"accuracy": float((predicted == truth).mean()), "macro_f1": macro_f1(confusion),
            "recall": per_class_recall(confusion),
            "ece": expected_calibration_error(probabilities, truth), "n": int(len(truth)),
            "confusion": confusion.tolist(),
            "mean_log_loss": float(-np.log(np.clip(probabilities[np.arange(len(truth)), truth], 1e-12, 1)).mean())}


def plot_confusion(confusion: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(labels), 1.0 + 0.5 * len(labels)))
    ax.imshow(c / np.maximum(c.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(c):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    short = [s if len(s) <= 14 else s[:13] + "…" for s in labels]
    ax.set_xticks(range(len(labels)), short, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), short, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_probabilities(labels: Sequence[str], probabilities: torch.Tensor, bounds: torch.Tensor, exact: bool,
                         slot: bool = False) -> str:
    """One line per label, most probable first (``slot``: the bounds are -log p(label | text), read at the slot)."""
    order = probabilities.argsort(descending=True).tolist()
    width = max(len(c) for c in labels)
    what, relation = ("-log p(label | text)", "=") if slot else ("-log p(text | label)", "=" if exact else "<=")
    return "\n".join(f"  {labels[i]:<{width}}  p = {float(probabilities[i]):.4f}   {what} {relation} "
                     f"{float(bounds[i]):.2f} nats" for i in order)
