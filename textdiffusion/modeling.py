"""Loading or building the masked LM and its tokenizer, and the masked-positions-only LM head.

Three ways to get a model:

* a hub id or a local ``save_pretrained`` directory of any masked LM (RoBERTa, DistilRoBERTa, BERT,
  ModernBERT, ...) through ``AutoModelForMaskedLM`` / ``AutoTokenizer``;
* a from-scratch preset (``micro``/``tiny``/``small``/``base``): a ModernBERT configuration (pre-norm,
  rotary positions, GLU) with a byte-level BPE tokenizer trained on the training corpus.

Why the presets are "local first". At initialisation attention is uniform, so in a global layer a masked
token's neighbours make up 1/128 of what it sees, and the gradient that would teach attention to look at
them is just as weak: trained from scratch on the small bundled corpus, a post-LN RoBERTa *and* a
ModernBERT with its stock layout (global every third layer, 128-token windows) sit on the unigram
plateau for thousands of steps. With a narrow sliding window (+-2 tokens) in the lower layers the
neighbours carry 1/5 of the signal from step one: the model learns bigram-like statistics at once and
the global layers above it build longer-range context. ``benchmarks/preset_plateau.py`` measures this.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UsageError

logger = logging.getLogger(__name__)

TOKENIZER_STAMP = "textdiffusion_tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    local_layers: int  # the lowest layers use a narrow sliding window; the rest attend globally
    local_window: int = 4  # total window of a local layer (ModernBERT's local_attention): +-2 tokens


PRESETS = {
    # "micro" exists for tests and smoke runs: two layers, seconds per hundred steps on a CPU.
    "micro": Preset(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=1024,
                    local_layers=1),
    "tiny": Preset(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=4096,
                   local_layers=2),
    "small": Preset(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768, vocab_size=16384,
                    local_layers=3),
    # DistilRoBERTa's size (6 x 768, a GLU as wide in weights as its 3072 MLP): the GPU benchmark's model
    "distil": Preset(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=2048, vocab_size=32768,
                     local_layers=2),
    "base": Preset(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1152, vocab_size=32768,
                   local_layers=4),
}


# -- tokenizer --------------------------------------------------------------------------------------
def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A RoBERTa-style byte-level BPE tokenizer trained on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        unk_token="<unk>", pad_token="<pad>", mask_token=AddedToken("<mask>", lstrip=True, special=True),
    )


def corpus_fingerprint(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256(str(vocab_size).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def preset_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path | None):
    """Train the preset tokenizer, or reuse the one cached in ``cache_dir`` for the same corpus and size."""
    from transformers import AutoTokenizer

    stamp = {"vocab_size": vocab_size, "corpus": corpus_fingerprint(texts, vocab_size)}
    if cache_dir is not None and (cache_dir / TOKENIZER_STAMP).exists():
        if json.loads((cache_dir / TOKENIZER_STAMP).read_text()) == stamp:
            logger.info("reusing the tokenizer cached in %s", cache_dir)
            return AutoTokenizer.from_pretrained(cache_dir)
    logger.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", vocab_size, len(texts))
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    if cache_dir is not None:
        tokenizer.save_pretrained(cache_dir)
        (cache_dir / TOKENIZER_STAMP).write_text(json.dumps(stamp))
    return tokenizer


# -- model ------------------------------------------------------------------------------------------
PRESET_ARCHITECTURES = ("modernbert", "modernbert-stock", "roberta")


def build_preset_model(preset: str, tokenizer, max_length: int, dropout: float = 0.0, architecture: str = "modernbert"):
    """A randomly initialised masked LM sized by ``preset`` for ``tokenizer``.

    ``architecture="modernbert"`` (default): pre-norm, rotary positions, GLU MLP, local-first attention
    (see the module docstring). ``"modernbert-stock"``: the same with ModernBERT's own attention layout,
    and ``"roberta"``: the classic post-LN encoder of the same width and depth. Both are kept for
    comparison only: from scratch on the bundled corpus they stall at the unigram plateau.
    """
    from transformers import ModernBertConfig, ModernBertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    if architecture not in PRESET_ARCHITECTURES:
        raise UsageError(f"--architecture must be one of {PRESET_ARCHITECTURES}, got {architecture!r}.")
    p = PRESETS[preset]
    tokens = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    size = dict(hidden_size=p.hidden_size, num_hidden_layers=p.num_hidden_layers,
                num_attention_heads=p.num_attention_heads)
    if architecture == "roberta":
        # A GLU MLP of width w has as many weights as a plain MLP of width 1.5 w.
        config = RobertaConfig(**tokens, **size, intermediate_size=p.intermediate_size * 3 // 2,
                               max_position_embeddings=max(512, max_length) + 2, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)
        return RobertaForMaskedLM(config)
    attention = {}
    if architecture == "modernbert":
        layers = ["sliding_attention"] * p.local_layers + ["full_attention"] * (p.num_hidden_layers - p.local_layers)
        attention = dict(layer_types=layers, local_attention=p.local_window)
    config = ModernBertConfig(
        **tokens, **size, intermediate_size=p.intermediate_size, max_position_embeddings=max(512, max_length),
        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
        embedding_dropout=dropout, mlp_dropout=dropout, attention_dropout=dropout, **attention,
    )
    return ModernBertForMaskedLM(config)


def load_masked_lm(name_or_path: str, dtype: torch.dtype | None = None, flag: str = "--model-name"):
    """(tokenizer, model) from a hub id or local directory, with an actionable error when it fails.

    Weights load as float32 unless ``dtype`` says otherwise: a model shipped in fp16 (the bundled one)
    is then trained and evaluated in full precision on any device.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise UsageError(f"{flag} {name_or_path!r} is a local path but holds no config.json: "
                         "it is not a save_pretrained model directory.")
    if local.is_dir():
        from .checkpoints import require_loadable_weights

        require_loadable_weights(local, flag)
        if not any((local / f).exists() for f in TOKENIZER_FILES) and not list(local.glob("*.model")):
            raise UsageError(f"{flag} {name_or_path!r} holds a model but no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                             "save the tokenizer beside it (tokenizer.save_pretrained) or copy its files there.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        with quiet_load_report():  # its missing/unexpected keys are reported below, in our words
            model, report = AutoModelForMaskedLM.from_pretrained(name_or_path, dtype=dtype or torch.float32,
                                                                 output_loading_info=True)
    except OSError as e:
        raise UsageError(
            f"{flag} {name_or_path!r} could not be loaded: it is not a local model directory and the "
            f"Hugging Face Hub did not provide it ({str(e).splitlines()[0][:160]}). Offline, train from scratch "
            "with --preset tiny|small|base, or pass a local directory saved with save_pretrained.") from None
    except ValueError as e:
        raise UsageError(f"{flag} {name_or_path!r} is not a masked language model "
                         f"({str(e).splitlines()[0][:160]}).") from None
    from .heads import missing_head_keys

    # an encoder shipped without its MLM head (all-mpnet-base-v2) loads with a random one: training builds
    # a useful head in its place (heads.build_head) when this list is not empty
    model.missing_head_keys = missing_head_keys(model, report["missing_keys"])
    other = sorted(set(report["missing_keys"]) - set(model.missing_head_keys))
    unused = sorted(k for k in report["unexpected_keys"] if not k.startswith("pooler."))  # a pooler is not used
    if other or unused:  # anything but a dropped head is worth a look
        logger.warning("%s %r: %d weight(s) missing from the checkpoint (newly initialised: %s) and %d unused (%s)",
                       flag, name_or_path, len(other), ", ".join(other[:4]) or "-", len(unused),
                       ", ".join(unused[:4]) or "-")
    return tokenizer, model


@contextlib.contextmanager
def quiet_load_report():
    """Drop Transformers' LOAD REPORT table for one load: an encoder without its MLM head (mpnet-base) would
    print a page of MISSING rows (and call itself corrupted) where `train` answers by building the head
    (heads.build_head); other missing weights are reported by load_masked_lm. A filter, not a
    higher log level: Transformers 5 runs a tensor-parallel check, with its own warning, at level >= WARNING."""
    log = logging.getLogger("transformers.modeling_utils")
    drop = logging.Filter()
    drop.filter = lambda record: not ("LOAD REPORT" in str(record.msg)  # nor its note on the absent head's tied bias
                                      or "seem corrupted" in str(record.msg) and "tie lm_head." in str(record.msg))
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def keep_first_layers(model, layers: int, flag: str = "--keep-layers"):
    """Drop all but the first ``layers`` encoder layers (DistilRoBERTa's recipe: a shallower copy of a
    pretrained encoder, with its embeddings and head), in place; returns the model."""
    encoder = getattr(model.base_model, "encoder", None)
    stack = getattr(encoder, "layer", None) if encoder is not None else getattr(model.base_model, "layers", None)
    if stack is None:
        raise UsageError(f"{flag}: cannot find the layer stack of a {model.config.model_type!r} model.")
    if not 1 <= layers <= len(stack):
        raise UsageError(f"{flag} must be between 1 and the model's {len(stack)} layers, got {layers}.")
    kept = nn.ModuleList(list(stack)[:layers])
    if encoder is not None and hasattr(encoder, "layer"):
        encoder.layer = kept
    else:
        model.base_model.layers = kept
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:layers]
    return model


# models whose learned position table starts after padding_idx + 1 (RoBERTa's convention)
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm", "mpnet")


def position_limit(config) -> int | None:
    """The longest sequence a model's position embeddings cover (None when it has no fixed limit)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is None:
        return None
    return limit - 2 if config.model_type in OFFSET_POSITIONS else limit


def check_position_limit(model, max_length: int, flag: str = "--max-length") -> None:
    limit = position_limit(model.config)
    if limit is not None and max_length > limit:
        raise UsageError(f"{flag} {max_length} is longer than the model's position limit ({limit} tokens, "
                         f"{model.config.model_type}); use at most {limit}.")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the LM head on masked positions only -----------------------------------------------------------
def masked_lm_head(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function hidden states -> vocabulary logits for architectures whose head we know.

    With it, training runs the backbone on every position but the (vocabulary-sized, expensive) head
    only on the masked ones: the same loss, far less work at low mask rates. ``None`` means unknown
    architecture; the caller then falls back to the model's full forward. A plain function, not the
    head module, so that a wrapper holding it does not register the head's weights a second time.
    """
    kind = model.config.model_type
    if kind in ("roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm", "mpnet"):
        return lambda h: model.lm_head(h)
    if kind == "bert":
        return lambda h: model.cls(h)
    if kind == "modernbert":
        return lambda h: model.decoder(model.head(h))
    if kind == "distilbert":
        return lambda h: model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
    return None


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


class MaskedDiffusionLM(TrainedModule):
    """A masked LM as the denoiser: ``denoiser(input_ids, attention_mask, masked_positions=mask)`` returns
    logits [n, vocab] at the masked positions only (without ``masked_positions``/``masked_index`` it
    returns the model's full output)."""

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


def denoiser_for(model: nn.Module, config=None) -> MaskedDiffusionLM:
    """The denoiser a checkpoint was trained as: a causal LM adapted with --adapt-from-causal (its
    DiffusionConfig says so) gets shifted logits and full attention, anything else the masked-LM wrapper."""
    if config is not None and getattr(config, "adapted_from_causal", False):
        from .adapt import CausalDiffusionLM

        return CausalDiffusionLM(model)
    return MaskedDiffusionLM(model)


def load_diffusion_model(name_or_path: str, config=None, dtype: torch.dtype | None = None, flag: str = "--checkpoint"):
    """(tokenizer, model) of a diffusion checkpoint: the causal LM of an adapted one (``config`` is its
    DiffusionConfig), else a masked LM. Wrap the model with ``denoiser_for(model, config)``."""
    if config is not None and getattr(config, "adapted_from_causal", False):
        from .adapt import load_adapted

        return load_adapted(name_or_path, dtype=dtype, flag=flag)
    return load_masked_lm(name_or_path, dtype=dtype, flag=flag)


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
