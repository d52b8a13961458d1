"""The autoregressive baseline: a GPT-2 of matched size on the same tokens, scored on the same tokens.

A diffusion LM's likelihood is only a bound (the NELBO); an autoregressive model's is exact. To compare
them fairly the baseline uses the *same tokenizer* (the preset's BPE, trained on the same corpus), the
same packed blocks, the same Trainer path, and it is scored on exactly the tokens the NELBO scores:
every position after the protected prefix that is not a special token. Then "perplexity 80 vs a bound
of 95" is a statement about the same 60k tokens.

GPT-2's MLP is plain (two matrices) where ModernBERT's is a GLU (three), so ``n_inner`` is 1.5 x the
preset's intermediate size: the same weights per layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.evaluation import BoundResult
from textdiffusion.errors import UsageError
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.models.presets import PRESETS

OBJECTIVES = ("diffusion", "ar")


def build_ar_model(preset: str, tokenizer, max_length: int, dropout: float = 0.0):
    """A randomly initialised GPT-2 with the preset's width, depth, heads and weights per layer."""
    from transformers import GPT2Config, GPT2LMHeadModel


    p = PRESETS[preset]
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(512, max_length), n_embd=p.hidden_size, n_layer=p.num_hidden_layers,
        n_head=p.num_attention_heads, n_inner=p.intermediate_size * 3 // 2, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None):
    """(tokenizer, model) of a causal LM directory or hub id, with an actionable error when it fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    name_or_path = resolve_checkpoint(name_or_path)  # a ready model's short name (wiki-small-ar)
    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise UsageError(f"--checkpoint {name_or_path!r} is a local path but holds no config.json.")
    if local.is_dir():
        from textdiffusion.models.checkpoints import require_loadable_weights

        require_loadable_weights(local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    except OSError as e:
        raise UsageError(f"--checkpoint {name_or_path!r} could not be loaded as a causal LM "
                         f"({str(e).splitlines()[0][:160]}); pass a local directory saved by "
                         "`textdiffusion train --objective ar`.") from None
    return tokenizer, model


@torch.inference_mode()
def causal_nll_per_block(model, blocks: torch.Tensor, scored: torch.Tensor,
                         batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] float64 exact NLL per scored token of each block, [n] scored tokens per block) of ``blocks``
    [n, l]; ``scored`` [n, l] bool says which tokens count (position 0 never does: nothing predicts it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_block_sum = torch.zeros(blocks.shape[0], dtype=torch.float64)
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()  # predicts positions 1..l-1
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, l-1]
        keep = scored[start:start + batch_size, 1:].to(device)
        per_block_sum[start:start + batch_size] = (ce * keep).sum(1).double().cpu()
    model.train(was_training)
    counts = scored[:, 1:].sum(1).double()
    return per_block_sum / counts.clamp_min(1), counts


def causal_nll(model, blocks: torch.Tensor, scored: torch.Tensor, batch_size: int = 32) -> BoundResult:
    """Exact NLL per scored token (nats) of ``blocks`` [n, l] over the ``scored`` tokens. The standard error
    is over blocks."""
    per_block, counts = causal_nll_per_block(model, blocks, scored, batch_size)
    total = float(counts.sum())
    stderr = float(per_block.std() / math.sqrt(len(per_block))) if len(per_block) > 1 else float("nan")
    return BoundResult(float((per_block * counts).sum()) / max(total, 1.0), stderr, int(total), "exact (autoregressive)")


class CausalGenerator:
    """Continuations from the AR baseline with Transformers' KV-cached ``generate``."""

    def __init__(self, model, tokenizer, device: torch.device, config=None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.config = config or DiffusionConfig(objective="ar")
        self.bos_id = tokenizer.bos_token_id

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device, dtype: torch.dtype | None = None) -> "CausalGenerator":
        path = resolve_checkpoint(path)  # a ready model's short name (wiki-small-ar)
        tokenizer, model = load_causal_lm(path, dtype=dtype)
        return cls(model, tokenizer, device, DiffusionConfig.from_pretrained(path) if Path(path).is_dir() else None)

    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int, sampling: str = "topk", temperature: float = 1.0,
                     top_k: int = 50, top_p: float = 0.9, repetition_penalty: float = 1.0, seed: int = 0,
                     min_new_tokens: int = 0) -> list[list[int]]:
        """The new token ids of each prompt's continuation (up to its first EOS)."""
        if not prompts:
            raise UsageError("nothing to generate: the list of prompts is empty.")
        rows = [([self.bos_id] if self.bos_id is not None else []) + self.tokenizer(p, add_special_tokens=False)["input_ids"]
                for p in prompts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every row's next token sits at the same position
            ids[i, width - len(r):] = torch.tensor(r)
            attention[i, width - len(r):] = 1
        kwargs = dict(do_sample=sampling != "greedy", max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                      use_cache=True, pad_token_id=pad, repetition_penalty=repetition_penalty)
        if sampling != "greedy":
            kwargs.update(temperature=temperature, top_k=top_k if sampling == "topk" else 0,
                          top_p=top_p if sampling == "nucleus" else 1.0)
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=attention.to(self.device), **kwargs)
        eos = self.tokenizer.eos_token_id
        new = [row[: row.index(eos)] if eos is not None and eos in row else row for row in out[:, width:].cpu().tolist()]
        return new

    def generate(self, prompts: Sequence[str], max_new_tokens: int, **kwargs) -> list[str]:
        """Prompt + continuation text for each prompt; ``kwargs`` as :meth:`generate_ids`."""
        new = self.generate_ids(prompts, max_new_tokens, **kwargs)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return [(p + t) if p else t.lstrip() for p, t in zip(prompts, texts)]
