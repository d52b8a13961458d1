"""The training objective: cross-entropy on masked tokens, optionally ELBO-weighted.

``loss_weighting="none"`` (the original design) is the plain mean cross-entropy over masked tokens, the
same number as ``model(input_ids, labels=labels).loss``. ``"elbo"`` multiplies each example's masked
cross-entropies by its weight -alpha'(t)/(1-alpha(t)) and divides by the number of maskable tokens, which
makes the loss the negative ELBO per token (MDLM, eq. 10): an upper bound on the model's NLL.

A batch may carry ``position_weight`` [b, l] (the collator's label target, labels.py): each masked position's
cross-entropy counts that many times (a weighted mean under "none").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from textdiffusion.core.collator import IGNORE_INDEX
from textdiffusion.core.denoiser import as_denoiser, masked_logits


def masked_predictions(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float logits [n, V] and targets [n] at the masked positions, and those positions [b, l] bool."""
    positions = batch["labels"] != IGNORE_INDEX  # [b, l]
    logits = masked_logits(model, batch["input_ids"], batch.get("attention_mask"), positions)  # [n, V]
    return logits.float(), batch["labels"][positions], positions


def _bucketed_loss(model, batch: dict[str, torch.Tensor], loss_weighting: str) -> torch.Tensor:
    """The same loss from a static-shape gather (``masked_index``, padded; -100 targets on the padding)."""
    attention = batch.get("attention_mask")
    if attention is not None and bool(attention.all()):
        attention = None
    logits = as_denoiser(model)(input_ids=batch["input_ids"], attention_mask=attention,
                                masked_index=batch["masked_index"])  # [n_bucket, V]
    targets = batch["masked_targets"]
    valid = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")  # 0 on padding
    count = valid.float()
    if "position_weight" in batch:
        w = batch["position_weight"].flatten()[batch["masked_index"]] * valid
        ce, count = ce * w, w
    if loss_weighting == "none":
        return ce.sum() / count.sum().clamp_min(1)
    row = batch["masked_index"] // batch["input_ids"].shape[1]
    return (ce * batch["loss_weight"][row]).sum() / batch["num_maskable"].sum().clamp_min(1)


def diffusion_loss(model, batch: dict[str, torch.Tensor], loss_weighting: str = "none") -> torch.Tensor:
    if loss_weighting not in ("none", "elbo"):
        raise ValueError(f"`loss_weighting` must be 'none' or 'elbo', got {loss_weighting!r}.")
    if "masked_index" in batch:
        return _bucketed_loss(model, batch, loss_weighting)
    logits, targets, positions = masked_predictions(model, batch)
    ce = F.cross_entropy(logits, targets, reduction="none")  # [n]
    if ce.numel() == 0:  # nothing masked in this batch: a zero that still carries a graph
        return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
    if "position_weight" in batch:
        w = batch["position_weight"][positions].to(ce.dtype)  # [n]
        if loss_weighting == "none":
            return (ce * w).sum() / w.sum()
        ce = ce * w
    if loss_weighting == "none":
        return ce.mean()
    weight = batch["loss_weight"][:, None].expand_as(positions)[positions]  # [n]
    return (ce * weight).sum() / batch["num_maskable"].sum().clamp_min(1)
