"""The training objectives, one registry entry each: diffusion (this project) and ar (the GPT-2 baseline).

An objective owns everything that differs between the two in training: how its model is built from a
preset or loaded from a checkpoint, what is done to it before Trainer wraps it, and which Trainer (and so
which batches and loss) trains it. Training asks the registry instead of branching on ``objective ==
"ar"``; a new objective is one entry. Evaluation and generation of a checkpoint dispatch on
``models.checkpoints.checkpoint_objective`` with their own small tables (``pipelines.evaluate``,
``cli.generate``). Imports are lazy so that choosing one never loads the other's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from textdiffusion.config import OBJECTIVES_WHAT
from textdiffusion.core.denoiser import MaskedDiffusionLM, TrainedModule
from textdiffusion.errors import UsageError
from textdiffusion.models.adapt import (
    CausalDiffusionLM,
    choose_special_tokens,
    load_causal_for_adaptation,
)
from textdiffusion.models.autoregressive import build_ar_model, load_causal_lm
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.models.checkpoints import checkpoint_objective
from textdiffusion.models.loading import load_masked_lm
from textdiffusion.models.presets import build_preset_model


@dataclass(frozen=True)
class Objective:
    name: str
    what: str  # one line for --help
    bound: str  # what its validation number is: an upper bound (NELBO) or the exact NLL
    outputs: str  # the report files a run of it writes
    build: Callable  # (preset, tokenizer, max_length, dropout, architecture) -> model
    load: Callable  # (name_or_path) -> (tokenizer, model)
    prepare: Callable  # (tokenizer, model) -> the module Trainer/Accelerate wrap and train
    trainer: Callable  # (tokenizer, diffusion collator, loss_weighting, **Trainer kwargs) -> Trainer


# -- diffusion ---------------------------------------------------------------------------------------
def _build_masked(preset, tokenizer, max_length, dropout, architecture):
    return build_preset_model(preset, tokenizer, max_length, dropout, architecture)


def _load_masked(name_or_path):
    return load_masked_lm(resolve_checkpoint(name_or_path, "--model-name"))  # a bundled or fetched name fine-tunes it


def _prepare_masked(tokenizer, model):
    return MaskedDiffusionLM(model)  # the LM head at masked positions only; Trainer wraps this module


def _diffusion_trainer(tokenizer, collator, loss_weighting, **kwargs):
    # the trainers import transformers' Trainer (~2.5 s): only where one is made, not in a repeated-data worker
    # or an `experiment` that builds its models through this registry
    from textdiffusion.pipelines.trainers import DiffusionTrainer

    return DiffusionTrainer(data_collator=collator, loss_weighting=loss_weighting, **kwargs)


# -- the autoregressive baseline ---------------------------------------------------------------------
def _build_causal(preset, tokenizer, max_length, dropout, architecture):
    return build_ar_model(preset, tokenizer, max_length, dropout)


def _load_causal(name_or_path):
    return load_causal_lm(name_or_path)


def _prepare_causal(tokenizer, model):
    if tokenizer.mask_token_id is None:  # the AR baseline never masks; the shared collator still wants the id
        tokenizer.add_special_tokens({"mask_token": "<mask>"})

    return TrainedModule(model)  # Trainer's causal-LM loss, through a module evaluation can bypass


def _causal_trainer(tokenizer, collator, loss_weighting, **kwargs):
    from transformers import DataCollatorForLanguageModeling

    from textdiffusion.pipelines.trainers import CausalTrainer

    return CausalTrainer(data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), **kwargs)


# -- a causal LM adapted to diffusion (train --adapt-from-causal) --------------------------------------
def _no_preset(preset, tokenizer, max_length, dropout, architecture):
    raise UsageError("--adapt-from-causal adapts the causal LM given by --model-name; it cannot start from --preset.")


def _load_adapted(name_or_path):
    return load_causal_for_adaptation(name_or_path)


def _prepare_adapted(tokenizer, model, anneal_steps):
    for note in choose_special_tokens(tokenizer, model):  # the tokenizer has no mask token (nor its own padding)
        print(note, flush=True)
    return CausalDiffusionLM(model, anneal_steps)  # shifted logits, attention annealed causal -> full


def _adapted_trainer(tokenizer, collator, loss_weighting, **kwargs):
    from textdiffusion.pipelines.trainers import AttentionAnnealCallback

    trainer = _diffusion_trainer(tokenizer, collator, loss_weighting, **kwargs)
    trainer.add_callback(AttentionAnnealCallback(kwargs["model"]))  # the step the attention anneals with
    return trainer


def adapted_objective(anneal_steps: int | None) -> Objective:
    """Diffusion, trained from a causal LM (DiffuGPT/DiffuLLaMA): its own loading, wrapper and annealing;
    the loss, evaluation and generation are the diffusion objective's."""
    diffusion = OBJECTIVES["diffusion"]
    return Objective("diffusion", "a causal LM adapted to masked diffusion (shifted logits, annealed attention)",
                     diffusion.bound, diffusion.outputs, _no_preset, _load_adapted,
                     partial(_prepare_adapted, anneal_steps=anneal_steps), _adapted_trainer)


# -- block diffusion of a causal LM (train --adapt-from-causal --block-size B [--lora-r R]) ---------------
def _prepare_block(tokenizer, model, block_size, lora_r):
    from textdiffusion.models.block import BlockDiffusionLM, add_lora

    for note in choose_special_tokens(tokenizer, model):
        print(note, flush=True)
    if lora_r:
        model = add_lora(model, lora_r, tokenizer.mask_token_id)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA r {lora_r} on the attention and MLP projections + the mask token's embedding row: "
              f"{trainable / 1e6:.2f}M trainable parameters; the clean copy is the frozen base's", flush=True)
    return BlockDiffusionLM(model, block_size)


def _block_trainer(tokenizer, collator, loss_weighting, *, block_size, complementary, mask_range=(0.05, 1.0),
                   clean_prefix=None, **kwargs):
    from textdiffusion.models.block import BlockCorruption
    from textdiffusion.pipelines.trainers import BlockDiffusionTrainer

    corruption = BlockCorruption(collator.mask_token_id, collator.pad_token_id, block_size,
                                 tuple(int(i) for i in collator._protected), complementary=complementary,
                                 seed=collator.seed, clean_prefix=clean_prefix, t_min=mask_range[0],
                                 t_max=mask_range[1])
    return BlockDiffusionTrainer(data_collator=corruption, corruption=corruption, loss_weighting=loss_weighting,
                                 **kwargs)


def block_objective(block_size: int, lora_r: int | None, complementary: bool,
                    mask_range: tuple[float, float] = (0.05, 1.0)) -> Objective:
    """Block diffusion (BD3-LM) of a causal LM: causal across blocks of ``block_size``, parallel inside one;
    LoRA adapters of rank ``lora_r`` (None: every weight)."""
    diffusion = OBJECTIVES["diffusion"]
    return Objective("diffusion", f"a causal LM as a block-diffusion model (blocks of {block_size})", "block NELBO",
                     diffusion.outputs, _no_preset, _load_adapted,
                     partial(_prepare_block, block_size=block_size, lora_r=lora_r),
                     partial(_block_trainer, block_size=block_size, complementary=complementary,
                             mask_range=mask_range))


OBJECTIVES: dict[str, Objective] = {
    "diffusion": Objective("diffusion", OBJECTIVES_WHAT["diffusion"], "NLL bound",
                           "per_level_loss.csv, per_level_loss.png and validation_curve.csv", _build_masked,
                           _load_masked, _prepare_masked, _diffusion_trainer),
    "ar": Objective("ar", OBJECTIVES_WHAT["ar"], "NLL", "validation_curve.csv", _build_causal, _load_causal,
                    _prepare_causal, _causal_trainer),
}


def objective_of_checkpoint(path: str) -> Objective:
    """The objective a checkpoint directory was trained with (see ``checkpoint_objective``)."""
    return OBJECTIVES[checkpoint_objective(path)]


# -- block diffusion of a masked LM (train --block-size B, from a preset or wiki-small) -------------------
def _prepare_encoder_block(tokenizer, model, block_size):
    from textdiffusion.models.block import EncoderBlockDiffusionLM

    return EncoderBlockDiffusionLM(model, block_size)


def encoder_block_objective(block_size: int, complementary: bool, prefix_length: int,
                            mask_range: tuple[float, float] = (0.05, 1.0)) -> Objective:
    """Block diffusion (BD3-LM) of a masked LM — a preset from scratch, or a masked diffusion model such as
    ``wiki-small`` fine-tuned into blocks as BD3-LM starts from MDLM; the collator's prompt prefix stays given."""
    diffusion = OBJECTIVES["diffusion"]
    return Objective("diffusion", f"masked diffusion in blocks of {block_size} (BD3-LM)", "block NELBO",
                     diffusion.outputs, _build_masked, _load_masked,
                     partial(_prepare_encoder_block, block_size=block_size),
                     partial(_block_trainer, block_size=block_size, complementary=complementary,
                             clean_prefix=prefix_length, mask_range=mask_range))
