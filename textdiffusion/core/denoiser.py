"""The denoiser: a Hugging Face masked LM called for logits at the masked positions only.

Training runs the backbone on every position but the vocabulary-sized head only where the loss is; the
sampler asks for logits where it may commit. ``MaskedDiffusionLM`` is that call, ``TrainedModule`` the
module Trainer wraps, ``masked_logits`` the one function the loss, the sampler's loop and the server use,
and ``position_limit`` how long a sequence a model's positions cover."""

from __future__ import annotations

import torch
from torch import nn

from textdiffusion.core.architectures import architecture, masked_lm_head
from textdiffusion.errors import UsageError


def position_limit(config) -> int | None:
    """The longest sequence a model's position embeddings cover (None when it has no fixed limit)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is None:
        return None
    arch = architecture(config)
    return limit - (arch.position_offset if arch is not None else 0)


def check_position_limit(model, max_length: int, flag: str = "--max-length") -> None:
    limit = position_limit(model.config)
    if limit is not None and max_length > limit:
        raise UsageError(f"{flag} {max_length} is longer than the model's position limit ({limit} tokens, "
                         f"{model.config.model_type}); use at most {limit}.")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


class TrainedModule(nn.Module):
    """The module Trainer trains: a Hugging Face model inside, the forward the objective needs outside.

    Trainer, DDP, Accelerate's mixed precision and ``torch.compile`` all wrap *this* module, so its
    forward is the one that runs (under DDP it synchronises gradients; under mixed precision Accelerate
    puts its autocast on it). The model inside is untouched: checkpoints save it in its own format (the
    Trainers unwrap it) and evaluation calls a fresh wrapper around it, which runs in full precision.
    This base class passes every call through; the AR baseline trains it as is.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def fresh(self) -> "TrainedModule":
        """The same module around the same weights, without whatever wrapped this instance's forward."""
        return type(self)(self.model)

    # Read by Trainer when a load reports missing keys (a Hugging Face model's attribute): none to ignore
    _keys_to_ignore_on_save = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also take the model inside's own format, the one checkpoints hold (they save the Hugging Face
        model, not this wrapper): Trainer loads a checkpoint into the module it trains, to resume and for
        the best model at the end. Weights tied to another (the decoder is the input embedding) are saved
        once, so they are not reported missing."""
        inner = self.model.state_dict().keys()
        ours = sum(key in inner for key in state_dict)
        if not ours or ours < sum(f"model.{key}" in state_dict for key in inner):  # this wrapper's format
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = self.model.load_state_dict(state_dict, strict=False, assign=assign)
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        result.missing_keys[:] = [key for key in result.missing_keys if key not in tied]
        if strict and (result.missing_keys or result.unexpected_keys):
            raise RuntimeError(f"loading {type(self.model).__name__}: missing keys {result.missing_keys}, "
                               f"unexpected keys {result.unexpected_keys}")
        return result


class MaskedDiffusionLM(TrainedModule):
    """A masked LM as the denoiser: ``denoiser(input_ids, attention_mask, masked_positions=mask)`` returns
    logits [n, vocab] at the masked positions only (without ``masked_positions``/``masked_index`` it
    returns the model's full output)."""

    shifted_logits = False  # True where the logit at position i is read from the hidden state at i - 1

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._head = masked_lm_head(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                masked_positions: torch.Tensor | None = None, masked_index: torch.Tensor | None = None, **kwargs):
        if masked_positions is None and masked_index is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self._head is None:  # unknown architecture: full logits, then select
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits  # [b, l, V]
            return logits[masked_positions] if masked_index is None else logits.flatten(0, 1)[masked_index]
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       **kwargs).last_hidden_state  # [b, l, d]
        if masked_index is not None:  # static-shape gather (see collator.bucketed_index)
            return self._head(hidden.flatten(0, 1).index_select(0, masked_index))  # [n_bucket, V]
        return self._head(hidden[masked_positions])  # [n, V]


def as_denoiser(model: nn.Module) -> nn.Module:
    """``model`` if it already is a denoiser (possibly DDP/compile-wrapped), else a MaskedDiffusionLM around it."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return model if isinstance(inner, MaskedDiffusionLM) else MaskedDiffusionLM(model)


def masked_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  positions: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] at ``positions`` ([b, l] bool) only. ``model``: a denoiser (possibly DDP-wrapped)
    or a plain masked LM, which is wrapped for the call (a few microseconds)."""
    model = as_denoiser(model)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: let SDPA take its fastest path
    return model(input_ids=input_ids, attention_mask=attention_mask, masked_positions=positions)
