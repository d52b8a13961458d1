"""One table of the model families this project knows, by Hugging Face ``model_type``: masked LMs, and the
decoder-only families a causal LM adapted to diffusion comes from (``models/adapt.py``).

Everything that differs between them is a column here, so adding a family is one row: where its MLM head
is (the denoiser calls it on masked positions only), whether its learned position table starts after the
padding index (RoBERTa's convention, two positions fewer than ``max_position_embeddings``), which head
layout ``models/heads.py`` can rebuild for an encoder shipped without one, and which layer-by-layer
forward ``models/kvcache.py`` has for it. A model type missing from the table still trains and generates
through its full forward (logits everywhere, then selected); it just gets none of the shortcuts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Architecture:
    head: Callable  # model -> (hidden [.., d] -> logits [.., V]): the MLM head, called on masked positions only
    position_offset: int = 0  # positions the learned table reserves before the first token (RoBERTa: 2)
    head_layout: str | None = None  # the rebuildable head's layout (models/heads.py): "lm_head" | "cls"
    kv_cache: str | None = None  # the cached forward (models/kvcache.py): "modernbert" | "post-ln" | "llama"


def _lm_head(model):
    return lambda h: model.lm_head(h)


_ROBERTA = Architecture(head=_lm_head, position_offset=2, head_layout="lm_head")  # RoBERTa's relatives: no cache yet
# a decoder-only LM (pre-norm, rotary, grouped-query attention); its cache serves it adapted to diffusion only
_LLAMA = Architecture(head=_lm_head, kv_cache="llama")

ARCHITECTURES: dict[str, Architecture] = {
    "roberta": Architecture(head=_lm_head, position_offset=2, head_layout="lm_head", kv_cache="post-ln"),
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "data2vec-text": _ROBERTA,
    "roberta-prelayernorm": _ROBERTA,
    "mpnet": Architecture(head=_lm_head, position_offset=2, head_layout="lm_head", kv_cache="post-ln"),
    "bert": Architecture(head=lambda model: (lambda h: model.cls(h)), head_layout="cls", kv_cache="post-ln"),
    "modernbert": Architecture(head=lambda model: (lambda h: model.decoder(model.head(h))), kv_cache="modernbert"),
    "distilbert": Architecture(head=lambda model: (lambda h: model.vocab_projector(model.vocab_layer_norm(
        model.activation(model.vocab_transform(h)))))),
    "llama": _LLAMA,
}


def architecture(model_or_config) -> Architecture | None:
    """The row of a model (or its config), None for a family the table does not know."""
    config = getattr(model_or_config, "config", model_or_config)
    return ARCHITECTURES.get(config.model_type)


def masked_lm_head(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function hidden states -> vocabulary logits for architectures whose head we know.

    With it, training runs the backbone on every position but the (vocabulary-sized, expensive) head
    only on the masked ones: the same loss, far less work at low mask rates. ``None`` means unknown
    architecture; the caller then falls back to the model's full forward. A plain function, not the
    head module, so that a wrapper holding it does not register the head's weights a second time.
    """
    arch = architecture(model)
    return arch.head(model) if arch is not None else None
