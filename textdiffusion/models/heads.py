"""A masked-LM head for encoders shipped without one, built so it is useful at step 0.

all-mpnet-base-v2 lost its MLM head when it was fine-tuned for sentence embeddings; loaded as
``MPNetForMaskedLM`` its head is random, so the first few hundred steps of a fine-tune only relearn what
the encoder already knows (its last hidden state still lines up with its token embeddings). Instead:

* the decoder is tied to the input embeddings (logits = hidden . embeddings^T, as pretrained);
* the transform is near identity: the dense layer scales the hidden state into GELU's linear range and
  shifts it by a constant, which the layer norm removes again; the layer norm's gain and bias are set to
  the hidden state's own mean per-token standard deviation and mean, so the head's output ~= the input;
* the output bias is the log unigram frequency of the training tokens (add-0.5 smoothing): at 100%
  masking, where the hidden state says nothing, the head already predicts the unigram distribution;
* two scalars, the logit scale of the hidden . embedding term and the weight of the log-frequency
  bias, are fitted (L-BFGS, convex) on a few training blocks masked at rates spread over (0, 1].

``warm_up_head`` then optionally fits the whole head for N steps with the encoder frozen: the encoder
runs without gradients, so a step costs about one forward pass (``train --head-warmup N``).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from textdiffusion.core.architectures import ARCHITECTURES, architecture, masked_lm_head
from textdiffusion.core.collator import IGNORE_INDEX

logger = logging.getLogger(__name__)



def _head_parts(model) -> tuple[str, nn.Linear, nn.LayerNorm, nn.Linear]:
    """(weight-name prefix, dense, layer norm, decoder) of the MLM head of a supported architecture."""
    layout = _layout(model)
    if layout == "lm_head":
        head = model.lm_head
        return "lm_head.", head.dense, head.layer_norm, head.decoder
    if layout == "cls":
        transform = model.cls.predictions.transform
        return "cls.", transform.dense, transform.LayerNorm, model.cls.predictions.decoder
    supported = sorted(k for k, a in ARCHITECTURES.items() if a.head_layout)
    raise NotImplementedError(f"building an MLM head for model type {model.config.model_type!r} is not supported "
                              f"(supported: {', '.join(supported)}).")


def _layout(model) -> str | None:
    arch = architecture(model)
    return arch.head_layout if arch is not None else None


def supports_head_building(model) -> bool:
    try:
        _head_parts(model)
    except NotImplementedError:
        return False
    return True


def missing_head_keys(model, missing_keys) -> list[str]:
    """The head weights a checkpoint did not provide (from ``from_pretrained``'s load report)."""
    if not supports_head_building(model):
        return []
    prefix = _head_parts(model)[0]
    return sorted(k for k in missing_keys if k.startswith(prefix) and not k.endswith("decoder.weight"))


def head_transform(model, hidden: torch.Tensor) -> torch.Tensor:
    """The head up to the decoder: dense -> activation -> layer norm (what the decoder then multiplies)."""
    if _layout(model) == "lm_head":
        head = model.lm_head
        return head.layer_norm(F.gelu(head.dense(hidden)))
    return model.cls.predictions.transform(hidden)


def unigram_log_probs(blocks: torch.Tensor, vocab_size: int, special_ids, smoothing: float = 0.5) -> torch.Tensor:
    """[V] log frequencies of the tokens of ``blocks`` (special tokens counted as unseen), add-``smoothing``."""
    ids = blocks.flatten()
    ids = ids[~torch.isin(ids, torch.tensor(sorted(set(special_ids)), dtype=ids.dtype))]
    counts = torch.bincount(ids, minlength=vocab_size)[:vocab_size].double() + smoothing
    return (counts / counts.sum()).log().float()


def _masked_sample(blocks: torch.Tensor, maskable: torch.Tensor, mask_id: int, g: torch.Generator):
    """Blocks masked at rates spread evenly over (0, 1] (one per block), as training will see them."""
    n = blocks.shape[0]
    rate = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n  # [n]
    masked = (torch.rand(blocks.shape, generator=g, dtype=torch.float64) < rate[:, None]) & maskable  # [n, l]
    return blocks.masked_fill(masked, mask_id), masked


@torch.no_grad()
def build_head(model, blocks: torch.Tensor, tokenizer, sample_blocks: int = 16, max_positions: int = 1024,
               seed: int = 0) -> dict[str, float]:
    """Initialise ``model``'s MLM head in place from its encoder and the training ``blocks`` (see the
    module docstring). Returns what was fitted, and the masked loss on the sample before/after."""
    _, dense, norm, decoder = _head_parts(model)
    embeddings = model.get_input_embeddings().weight
    if decoder.weight is not embeddings:
        decoder.weight = embeddings  # tied, whatever the config said
    vocab = embeddings.shape[0]
    special = list(tokenizer.all_special_ids)
    log_p = unigram_log_probs(blocks, vocab, special)  # [V]

    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(blocks.shape[0], generator=g)[:sample_blocks]
    sample = blocks[pick]  # [n, l]
    maskable = ~torch.isin(sample, torch.tensor(sorted(set(special))))
    inputs, masked = _masked_sample(sample, maskable, tokenizer.mask_token_id, g)
    was_training = model.training
    model.eval()
    device = embeddings.device
    attention = (sample != tokenizer.pad_token_id).long().to(device)
    hidden = model.base_model(input_ids=inputs.to(device), attention_mask=attention).last_hidden_state  # [n, l, d]
    h = hidden[masked.to(device)][:max_positions].float()  # [N, d]
    targets = sample[masked][:max_positions].to(device)  # [N]
    random_loss = float(F.cross_entropy(decoder(head_transform(model, h)).float(), targets))

    # near-identity transform: k*h + c lies in [c - 1, c + 1], where GELU is linear to 0.2%; the layer norm
    # removes the uniform shift c and the scale k again
    d = h.shape[1]
    scale = 1.0 / float(h.abs().max().clamp_min(1e-6))
    dense.weight.copy_(torch.eye(d) * scale)
    dense.bias.fill_(4.0)
    norm.weight.fill_(float(h.std(1, unbiased=False).mean()))  # the hidden state's own per-token spread ...
    norm.bias.fill_(float(h.mean(1).mean()))  # ... and level
    scores = head_transform(model, h) @ embeddings.float().T  # [N, V] hidden . embeddings

    # fit logits = a * scores + b * log_p (convex in (a, b))
    params = torch.tensor([1.0, 1.0], device=device, requires_grad=True)
    lp = log_p.to(device)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(params[0] * scores + params[1] * lp, targets)
            loss.backward()
        return loss

    optimizer.step(closure)
    a, b = (float(v) for v in params.detach())
    norm.weight.mul_(a)
    norm.bias.mul_(a)
    decoder.bias.copy_(b * lp)
    built_loss = float(F.cross_entropy(decoder(head_transform(model, h)).float(), targets))
    model.train(was_training)
    result = {"logit_scale": a, "unigram_weight": b, "positions": int(targets.numel()),
              "random_head_loss": random_loss, "built_head_loss": built_loss, "log_vocab": math.log(vocab)}
    logger.info("built the missing MLM head: logit scale %.3f, unigram weight %.3f; masked loss on %d sample "
                "positions %.3f -> %.3f nats (log V = %.2f)", a, b, result["positions"], random_loss, built_loss,
                math.log(vocab))
    return result


def head_parameters(model) -> list[nn.Parameter]:
    """The head's own parameters (the decoder's weight is the input embedding: the encoder's)."""
    _, dense, norm, decoder = _head_parts(model)
    params = [*dense.parameters(), *norm.parameters()]
    if decoder.bias is not None:
        params.append(decoder.bias)
    return params


def warm_up_head(model, blocks: torch.Tensor, collator, steps: int, batch_size: int, learning_rate: float = 1e-3,
                 seed: int = 0, log_every: int = 0) -> list[float]:
    """Fit the head alone for ``steps`` steps on training batches (the encoder frozen: no gradients through
    it); returns the loss of each step. The collator is the run's own, so the mask rates are training's."""
    head = masked_lm_head(model)
    params = head_parameters(model)
    tied = _head_parts(model)[3].weight  # the input embeddings: the encoder's, frozen here
    tied_grad = tied.requires_grad
    tied.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    losses = []
    for step in range(steps):
        rows = torch.randint(blocks.shape[0], (batch_size,), generator=g)
        batch = collator([{"input_ids": row} for row in blocks[rows]])
        positions = batch["labels"] != IGNORE_INDEX  # [b, l]
        with torch.no_grad():
            hidden = model.base_model(input_ids=batch["input_ids"].to(device),
                                      attention_mask=batch["attention_mask"].to(device)).last_hidden_state  # [b, l, d]
        logits = head(hidden[positions.to(device)])  # [n, V]
        loss = F.cross_entropy(logits.float(), batch["labels"][positions].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"head warm-up step {step + 1}/{steps}: masked loss {sum(losses[-log_every:]) / log_every:.4f}",
                  flush=True)
    tied.requires_grad_(tied_grad)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return losses
