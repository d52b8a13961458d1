"""What the model has learned: masked-token loss at each corruption level, and a likelihood bound.

A diffusion LM must denoise at every level, so one validation loss hides too much: a model can be good
at 15% masking and useless at 90%. ``per_level_loss`` masks the same validation blocks at 0.1 ... 1.0 with
a fixed seed (so numbers from different evaluations and checkpoints are comparable) and reports the
cross-entropy and top-1 accuracy of the masked tokens at each level. ``nelbo`` turns the same model into
an upper bound on negative log-likelihood per token, comparable with an autoregressive model's NLL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from textdiffusion.config import DEFAULT_MASK_PROBS
from textdiffusion.core.collator import DiffusionCollator
from textdiffusion.core.loss import masked_predictions


def scored_positions(blocks, tokenizer, prefix_length: int):
    """[n, l] bool: the tokens a likelihood is reported on — after the prefix, not special, not padding.
    The same set the collator may mask, so NELBO and AR NLL count the same tokens."""
    positions = torch.arange(blocks.shape[1])[None, :]
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    return (positions >= prefix_length) & ~torch.isin(blocks, special)


@dataclass
class LevelResult:
    mask_rate: float
    loss: float
    accuracy: float
    tokens: int


@torch.inference_mode()
def per_level_loss(model, blocks: torch.Tensor, collator: DiffusionCollator,
                   levels=DEFAULT_MASK_PROBS, batch_size: int = 32, seed: int = 1234) -> list[LevelResult]:
    """Masked-token cross-entropy (nats) and accuracy at each mask rate in ``levels``.

    ``collator`` supplies the token ids and the protection rules (prefix, special tokens); its own
    sampling settings are ignored: each level masks every maskable token with probability = level.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = []
    for level in levels:
        fixed = DiffusionCollator(
            mask_token_id=collator.mask_token_id, pad_token_id=collator.pad_token_id,
            protected_token_ids=collator.protected_token_ids, time_sampling="grid", mask_probs=(level,),
            prefix_length=collator.prefix_length, seed=seed)
        total, correct, count = 0.0, 0, 0
        for start in range(0, blocks.shape[0], batch_size):
            batch = fixed(blocks[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, targets, _ = masked_predictions(model, batch)
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
        results.append(LevelResult(level, total / max(count, 1), correct / max(count, 1), count))
    model.train(was_training)
    return results


@dataclass
class BoundResult:
    """Negative ELBO per token (nats) with its Monte-Carlo standard error, and what follows from it."""

    nats_per_token: float
    stderr: float
    tokens: int
    estimator: str

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2)

    @property
    def perplexity_bound(self) -> float:
        return math.exp(self.nats_per_token)


def _mask_exactly(maskable: torch.Tensor, k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[b, l] bool: exactly k[row] of each row's maskable positions, chosen uniformly at random."""
    scores = torch.rand(maskable.shape, generator=g).masked_fill(~maskable, 2.0)  # unmaskable sort last
    rank = scores.argsort(dim=1).argsort(dim=1)
    return rank < k[:, None]


@dataclass
class MaskDraws:
    """The random masks of a NELBO estimate: ``masked`` [n*S, l] (the S draws of block i are rows
    i*S .. i*S+S-1) and ``scale`` [n*S] float64, which turns a row's summed masked cross-entropy into one
    draw of the NELBO per maskable token (1/k for exact-k, 1/(t L) for continuous time)."""

    masked: torch.Tensor
    scale: torch.Tensor


def draw_masks(maskable: torch.Tensor, samples: int, estimator: str, g: torch.Generator) -> MaskDraws:
    """Draw ``samples`` masks of each row of ``maskable`` [n, l] for ``nelbo``'s estimators. The draws
    depend only on ``maskable`` and ``g``: blocks that differ in a protected token (a label) get the same
    masks, which is what makes the bounds of one text under different labels comparable (classify.py)."""
    if estimator not in ("exact-k", "continuous"):
        raise ValueError(f"`estimator` must be 'exact-k' or 'continuous', got {estimator!r}.")
    n, S = maskable.shape[0], samples
    maskable = maskable.repeat_interleave(S, 0)  # [n*S, l]
    L = maskable.sum(1)  # [n*S]
    sample = torch.arange(S).repeat(n)  # [n*S] which sample of its block a row is
    if estimator == "exact-k":
        # stratified: sample s of S draws k from the s-th of S equal slices of 1..L
        u = (sample + torch.rand(n * S, generator=g, dtype=torch.float64)) / S
        k = torch.minimum((u * L).floor().long() + 1, L)
        return MaskDraws(_mask_exactly(maskable, k, g), 1.0 / k.clamp_min(1).double())
    offset = torch.rand(n, generator=g, dtype=torch.float64).repeat_interleave(S)
    t = ((offset + sample / S) % 1.0).clamp_min(1e-6)  # [n*S] antithetic within each block
    masked = (torch.rand(maskable.shape, generator=g, dtype=torch.float64) < t[:, None]) & maskable
    return MaskDraws(masked, 1.0 / t / L.double().clamp_min(1))


@torch.inference_mode()
def masked_ce_sums(model, ids: torch.Tensor, masked: torch.Tensor, mask_token_id: int, batch_size: int = 32,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[r] float64: for each row of ``ids`` [r, l], the summed cross-entropy (nats) of its ``masked``
    tokens predicted with all of them masked; rows run in batches of ``batch_size``."""
    device = next(model.parameters()).device
    ce_sum = torch.zeros(ids.shape[0], dtype=torch.float64)  # [r]
    for start in range(0, ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        batch = {"input_ids": ids[rows].masked_fill(masked[rows], mask_token_id).to(device),
                 "labels": torch.where(masked[rows], ids[rows], -100).to(device)}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask[rows].to(device)
        logits, targets, _ = masked_predictions(model, batch)
        ce = F.cross_entropy(logits, targets, reduction="none").double().cpu()  # [n_masked]
        ce_sum[rows] = torch.zeros(ce_sum[rows].shape[0], dtype=torch.float64).index_add_(0, masked[rows].nonzero()[:, 0], ce)
    return ce_sum


def weighted_mean(per_block: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """Token-weighted mean of per-block values (nats/token) and its standard error: that of a ratio
    estimator (the weighted mean), not of the plain mean over blocks."""
    per_block, weights = per_block.double(), weights.double()
    mean = float((per_block * weights).sum() / weights.sum())
    n = per_block.shape[0]
    if n < 2:
        return mean, float("nan")
    return mean, float(math.sqrt(n / (n - 1) * float((weights ** 2 * (per_block - mean) ** 2).sum())) / weights.sum())


@torch.inference_mode()
def nelbo_per_block(model, blocks: torch.Tensor, collator: DiffusionCollator, estimator: str = "exact-k",
                    samples_per_block: int = 4, batch_size: int = 32, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] float64 NELBO per scored token of each block, [n] scored tokens per block): ``nelbo`` before
    pooling, for comparisons paired block by block (benchmarks that score two models on the same blocks)."""
    if estimator not in ("exact-k", "continuous"):
        raise ValueError(f"`estimator` must be 'exact-k' or 'continuous', got {estimator!r}.")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    n, S = blocks.shape[0], samples_per_block
    maskable_all = collator.maskable(blocks, torch.full((n,), collator.prefix_length))  # [n, l]
    draws = draw_masks(maskable_all, S, estimator, g)
    ids = blocks.repeat_interleave(S, 0)  # [n*S, l]: the S samples of block i are rows i*S .. i*S+S-1
    ce_sum = masked_ce_sums(model, ids, draws.masked, collator.mask_token_id, batch_size)  # [n*S]
    model.train(was_training)
    contribution = ce_sum * draws.scale  # [n*S] a draw of NELBO / L per row
    return contribution.view(n, S).mean(1), maskable_all.sum(1).double()


def nelbo(model, blocks: torch.Tensor, collator: DiffusionCollator, estimator: str = "exact-k",
          samples_per_block: int = 4, batch_size: int = 32, seed: int = 1234) -> BoundResult:
    """Upper bound on the negative log-likelihood per token of ``blocks`` under the masked diffusion model.

    For masked diffusion the NELBO is schedule-invariant (MDLM): with the linear schedule it is
    E_t[(1/t) * sum over masked i of -log p(x_i | x_t)] / L. Conditioning on how many tokens are masked
    turns the integral over t into a sum: sum_{k=1..L} (1/k) * E_{|M|=k}[sum_{i in M} -log p(x_i | x_M)],
    so the NELBO per token is E_{k ~ U{1..L}}[mean masked cross-entropy with exactly k masked].

    * ``"exact-k"``: k is stratified over 1..L across the samples of each block (low variance);
    * ``"continuous"``: the textbook estimator, t ~ U(0, 1), Bernoulli(t) masks, weight 1/t — an
      independent check of the same quantity with more variance; the samples of a block take antithetic
      t (one offset, evenly spaced mod 1), which lowers that variance without bias.

    L counts the maskable tokens of a block: the collator's protected prefix and special tokens are
    conditioned on, not scored. All samples of all blocks are drawn at once and run in batches of
    ``batch_size`` rows. The result is the token-weighted mean over blocks (each block's samples averaged
    first); its standard error is that of the weighted mean (a ratio estimator), not of the plain mean.
    """
    per_block, weights = nelbo_per_block(model, blocks, collator, estimator, samples_per_block, batch_size, seed)
    mean, stderr = weighted_mean(per_block, weights)
    return BoundResult(mean, stderr, int(weights.sum()), estimator)


@dataclass
class EndOfTextResult:
    """How well a model predicts where a document ends (see ``end_of_text_at_document_ends``)."""

    mean_probability: float
    argmax_rate: float
    document_ends: int


@torch.inference_mode()
def end_of_text_at_document_ends(model, blocks: torch.Tensor, eos_token_id: int, mask_token_id: int,
                                 protected_ids, rate: float = 0.5, batch_size: int = 32,
                                 seed: int = 1234) -> EndOfTextResult:
    """Probability of end-of-text, and how often it is the argmax, at the true document ends of ``blocks``.

    Every interior separator of a packed block (a document end; not the block's own closing one) is
    masked, and so is each other non-special token with probability ``rate`` (a fixed seed): the model
    must say from partial context that the text stops here. A model that never saw end-of-text as a
    target puts about 1e-7 there; one that learned to stop should make it the likeliest token often.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ends = blocks == eos_token_id  # [n, l]
    ends[:, 0] = ends[:, -1] = False
    special = torch.isin(blocks, torch.tensor(sorted(set(protected_ids) | {eos_token_id})))
    masked = ends | ((torch.rand(blocks.shape, generator=g) < rate) & ~special)  # [n, l]
    probs, hits = [], []
    for start in range(0, blocks.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        if not bool(ends[rows].any()):
            continue
        batch = {"input_ids": blocks[rows].masked_fill(masked[rows], mask_token_id).to(device),
                 "labels": torch.where(ends[rows], blocks[rows], -100).to(device)}
        logits, _, _ = masked_predictions(model, batch)  # [n_ends, V]
        probs.append(logits.softmax(-1)[:, eos_token_id].cpu())
        hits.append((logits.argmax(-1) == eos_token_id).cpu())
    model.train(was_training)
    if not probs:
        return EndOfTextResult(float("nan"), float("nan"), 0)
    p, h = torch.cat(probs), torch.cat(hits)
    return EndOfTextResult(float(p.mean()), float(h.float().mean()), int(p.numel()))
