"""Loading a masked LM and its tokenizer: a hub id, a local ``save_pretrained`` directory of any masked LM
(RoBERTa, DistilRoBERTa, BERT, ModernBERT, MPNet, ...) through ``AutoModelForMaskedLM`` / ``AutoTokenizer``,
or a checkpoint of this project (a causal LM adapted to diffusion included). From-scratch presets are in
``presets.py``; the denoiser wrapper in ``core/denoiser.py``."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.denoiser import MaskedDiffusionLM
from textdiffusion.errors import UsageError
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.models.heads import missing_head_keys
from textdiffusion.models.presets import TOKENIZER_FILES

logger = logging.getLogger(__name__)


def load_masked_lm(name_or_path: str, dtype: torch.dtype | None = None, flag: str = "--model-name"):
    """(tokenizer, model) from a hub id or local directory, with an actionable error when it fails.

    Weights load as float32 unless ``dtype`` says otherwise: a model shipped in fp16 (the bundled one)
    is then trained and evaluated in full precision on any device.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    _refuse_causal(name_or_path, flag)
    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise UsageError(f"{flag} {name_or_path!r} is a local path but holds no config.json: "
                         "it is not a save_pretrained model directory.")
    if local.is_dir():
        from textdiffusion.models.checkpoints import require_loadable_weights

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


def _refuse_causal(name_or_path: str, flag: str) -> None:
    """A causal LM where a masked LM is expected: a one-line error that says how it denoises (adapted with
    --adapt-from-causal), before any weights are read. A GGUF file or 'smollm2' is always one."""
    from textdiffusion.models.adapt import SUPPORTED_CAUSAL

    config = Path(name_or_path).expanduser() / "config.json"
    if name_or_path == "smollm2" or name_or_path.endswith(".gguf"):
        what = "a causal LM"
    elif config.is_file():
        import json

        settings = json.loads(config.read_text())
        architectures = settings.get("architectures") or []
        if settings.get("model_type") not in SUPPORTED_CAUSAL and not any(a.endswith("ForCausalLM") for a in architectures):
            return
        what = f"a causal LM ({', '.join(architectures) or settings.get('model_type')})"
    else:
        return
    if flag == "--model-name":
        how = "add --adapt-from-causal to adapt it to diffusion (shifted logits, attention annealed to full)"
    else:
        how = ("only a run of `train --adapt-from-causal` denoises with one, and its diffusion_config.json says "
               "adapted_from_causal: true; this one does not")
    raise UsageError(f"{flag} {name_or_path!r} is {what}, not a masked LM: {how}.", field=flag.lstrip("-").replace("-", "_"),
                     value=name_or_path)


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


def denoiser_for(model: nn.Module, config=None) -> MaskedDiffusionLM:
    """The denoiser a checkpoint was trained as: a causal LM adapted with --adapt-from-causal (its
    DiffusionConfig says so) gets shifted logits and full attention, anything else the masked-LM wrapper."""
    if config is not None and getattr(config, "block_size", None):
        from textdiffusion.models.block import BlockDiffusionLM, EncoderBlockDiffusionLM

        causal = getattr(config, "adapted_from_causal", False)
        return (BlockDiffusionLM if causal else EncoderBlockDiffusionLM)(model, config.block_size)
    if config is not None and getattr(config, "adapted_from_causal", False):
        from textdiffusion.models.adapt import CausalDiffusionLM

        return CausalDiffusionLM(model)
    return MaskedDiffusionLM(model)


def load_diffusion_model(name_or_path: str, config=None, dtype: torch.dtype | None = None, flag: str = "--checkpoint"):
    """(tokenizer, model) of a diffusion checkpoint: the causal LM of an adapted one (``config`` is its
    DiffusionConfig), else a masked LM. Wrap the model with ``denoiser_for(model, config)``."""
    if config is not None and getattr(config, "block_size", None) and getattr(config, "adapted_from_causal", False):
        from textdiffusion.models.adapt import load_block_model

        return load_block_model(name_or_path, config, dtype=dtype, flag=flag)
    if config is not None and getattr(config, "adapted_from_causal", False):
        from textdiffusion.models.adapt import load_adapted

        return load_adapted(name_or_path, dtype=dtype, flag=flag)
    return load_masked_lm(name_or_path, dtype=dtype, flag=flag)


@dataclass
class OpenedCheckpoint:
    """A diffusion checkpoint, opened: the model as saved, its tokenizer and settings, and the denoiser it was
    trained as (masked-positions logits; shifted logits for a causal LM adapted to diffusion)."""

    path: str
    tokenizer: object
    model: nn.Module
    config: DiffusionConfig
    denoiser: MaskedDiffusionLM


def open_checkpoint(name_or_path: str, dtype: torch.dtype | None = None, missing_head: str = "refuse") -> OpenedCheckpoint:
    """The one way a diffusion checkpoint is opened: a short name (``wiki-small``, a built or fetched model), a
    directory of this project (its ``diffusion_config.json`` says how it was trained, an adapted causal LM
    included) or any masked LM from elsewhere (the foreign-model defaults).

    ``missing_head``: what to do with an encoder saved without its MLM head (mpnet-base as fetched):
    ``"refuse"`` — its text would be noise (generation); ``"keep"`` — the caller builds one from its data
    (``models.heads.build_head``: evaluation and training do), ``model.missing_head_keys`` lists it.
    """
    if missing_head not in ("refuse", "keep"):
        raise ValueError(f"`missing_head` must be 'refuse' or 'keep', got {missing_head!r}.")
    path = resolve_checkpoint(name_or_path)
    config = DiffusionConfig.from_pretrained(path)  # a model from elsewhere: the foreign-model defaults
    tokenizer, model = load_diffusion_model(path, config, dtype=dtype, flag="--checkpoint")
    if missing_head == "refuse" and getattr(model, "missing_head_keys", None):
        raise UsageError(f"--checkpoint {path!r} is an encoder without a trained MLM head (such as mpnet-base as "
                         "fetched); fine-tune it first, e.g. `textdiffusion train --config recipes/mpnet-wiki.yaml`, "
                         "and generate from that run.", field="checkpoint", value=path)
    return OpenedCheckpoint(path, tokenizer, model, config, denoiser_for(model, config))
