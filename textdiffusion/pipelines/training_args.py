"""The settings of a training run (``textdiffusion train``'s flags): the corruption (``CorruptionConfig``),
the model to start from, the data, and every ``transformers.TrainingArguments`` field, validated in one place.

Design: one dataclass, ``TrainArgs(CorruptionConfig, TrainingArguments)``, not a project dataclass parsed
beside ``TrainingArguments`` (``HfArgumentParser((ProjectArgs, TrainingArguments))``). With one object the
run stays ``run_training(args)``, the Trainer takes ``args`` itself (no hand-written mapping of fields that
drifts from Transformers), a recipe stays one flat YAML namespace, and checks that span both halves (the
batch against the data, ``--precision`` against ``--bf16``) live in one ``__post_init__``. The price:
constructing one runs ``TrainingArguments.__post_init__`` (it sets up the device, as every HF script does).

So every standard flag works and is documented by Transformers (``--gradient_accumulation_steps``,
``--report_to``, ``--push_to_hub``, ``--lr_scheduler_type``, ...). Fields whose default differs from
Transformers' are redeclared below with this project's default (the evaluation schedule, best checkpoint
as the final model, no trackers unless asked). The names this command had before it took
``TrainingArguments`` whole stay as aliases: ``ALIASES`` is the one table, read by the flags (field
metadata), the recipes (``--config``) and Python (``TrainArgs(batch_size=8)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SchedulerType

from textdiffusion.config import OBJECTIVE_NAMES, OBJECTIVES_WHAT, CorruptionConfig
from textdiffusion.errors import UsageError
from textdiffusion.models.presets import PRESET_ARCHITECTURES, PRESETS

RUN_ARGS_NAME = "run_args.json"


# Settings that define "the same run": --resume refuses an output dir trained with other values.
RUN_IDENTITY = ("objective", "adapt_from_causal", "model_name", "keep_layers", "preset", "architecture", "dataset",
                "text_column", "max_length", "vocab_size", "seed", "label_column", "exclude_labels", "block_size", "lora_r")


# What --quick-test means: a CPU-sized run of the whole pipeline (about 10 minutes on 2 cores with --preset tiny).
QUICK_TEST = {"max_steps": 1500, "eval_steps": 300, "eval_blocks": 128, "logging_steps": 50}

# This command's names for TrainingArguments fields, from before it took them whole: flags (--batch-size),
# recipe keys (batch_size: 32) and Python keywords (TrainArgs(batch_size=32)). Names the two share
# (learning_rate, max_steps, eval_steps, seed, output_dir, ...) need no entry; --precision stays a flag of
# its own (its 'auto' has no TrainingArguments equivalent) and sets --bf16/--fp16.
ALIASES = {
    "batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs",
    "warmup": "warmup_steps",
    "num_workers": "dataloader_num_workers",
    "compile": "torch_compile",
    "resume": "resume_from_checkpoint",  # --resume alone: "last"
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def as_flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _alias_flags(name: str) -> list[str]:
    """The option strings of ``name``'s aliases, both spellings (``--batch-size``, ``--batch_size``)."""
    return [spelling for old, new in ALIASES.items() if new == name
            for spelling in dict.fromkeys((as_flag(old), f"--{old}"))]


def flag_name(name: str) -> str:
    """How an error names a setting: its flag, with the alias users may have typed (``--num-train-epochs (--epochs)``)."""
    old = [as_flag(o) for o, new in ALIASES.items() if new == name]
    return f"{as_flag(name)} ({old[0]})" if old else as_flag(name)


def resolve_aliases(settings: Mapping[str, Any], source: str = "TrainArgs", as_flags: bool = False) -> dict:
    """``settings`` with every alias renamed to its TrainingArguments field; a setting given both ways is
    an error (which one wins would be a guess). ``source`` and ``as_flags`` shape the message."""
    out = dict(settings)
    for old, new in ALIASES.items():
        if old in out:
            if new in out:
                a, b = (as_flag(old), as_flag(new)) if as_flags else (old, new)
                raise UsageError(f"{source}: {a} and {b} are the same setting ({new}); give only one of them.")
            out[new] = out.pop(old)
    return out


def cpu_has_bf16_matmul() -> bool:
    """True on CPUs with AMX bf16 tiles (Sapphire Rapids and later): there, bf16 autocast trains about
    1.2-1.4x faster than fp32 (benchmarks/train_throughput.py); without them bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags


def _precision_flags(precision: str) -> dict:
    """Mixed precision keeps fp32 master weights; ``auto`` picks bf16 wherever the hardware runs it fast."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        return {"bf16": torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16_matmul()}
    if precision in ("bf16", "fp16"):
        return {precision: True}
    return {}


def _resume_value(value: Any) -> Optional[str]:
    """--resume (or resume: true in a recipe) means the newest good checkpoint: "last"."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false", "no", "0")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "yes", "1", "last")):
        return "last"
    return str(value)


@dataclass
class _TrainFields(CorruptionConfig, TrainingArguments):
    """The fields and checks of ``TrainArgs`` (which adds the aliases to the constructor)."""

    # what to train
    objective: str = field(default="diffusion", metadata={
        "help": "; ".join(f"{name}: {what}" for name, what in OBJECTIVES_WHAT.items())})
    model_name: str = field(default="distilroberta-base", metadata={
        "help": "Hub id or local directory of a masked LM to fine-tune (ignored with --preset)."})
    preset: Optional[str] = field(default=None, metadata={
        "help": f"Train from scratch: one of {sorted(PRESETS)} (a ModernBERT config and a BPE tokenizer trained on the data)."})
    architecture: str = field(default="modernbert", metadata={
        "help": "Architecture of a preset: modernbert (local-first attention), or for comparison modernbert-stock "
                "(ModernBERT's own attention layout) and roberta (post-LN); both plateau from scratch."})
    adapt_from_causal: bool = field(default=False, metadata={
        "help": "--model-name is a causal LM (Llama family: a directory, a .gguf file, or 'smollm2' from the offline "
                "wheel) to adapt to diffusion as DiffuGPT/DiffuLLaMA do: shifted logits, attention annealed from causal "
                "to full, an unused special token as the mask."})
    attention_anneal_steps: Optional[int] = field(default=None, metadata={
        "help": "With --adapt-from-causal: optimiser steps over which attention goes from causal to full "
                "(0: full from the start; default: the first tenth of the run)."})
    block_size: Optional[int] = field(default=None, metadata={
        "help": "Block diffusion (BD3-LM) with blocks of this many tokens — causal across blocks, parallel inside "
                "one, exact KV cache of finished blocks (models/block.py): of a causal LM with --adapt-from-causal, "
                "else of a ModernBERT (a --preset, or --model-name wiki-small). Unset: full-sequence diffusion."})
    lora_r: Optional[int] = field(default=None, metadata={
        "help": "With --block-size: train LoRA adapters of this rank (peft; attention and MLP projections, plus the "
                "mask token's embedding row) instead of every weight; the checkpoint is the adapter."})
    block_mask_range: list[float] = field(default_factory=lambda: [0.05, 1.0], metadata={
        "help": "With --block-size: each block's mask level is drawn uniformly from [LO, HI] in training (BD3-LM's "
                "clipped schedule: a narrower range lowers the loss's variance); the evaluation bound covers (0, 1]."})
    complementary_masks: bool = field(default=True, metadata={
        "help": "With --block-size: each block also trains with the complementary mask (every token a target once)."})
    keep_layers: int = field(default=0, metadata={
        "help": "Keep only the first N encoder layers of --model-name (0: all), e.g. 6 of 12 as DistilRoBERTa."})
    head_init: str = field(default="built", metadata={
        "help": "When --model-name ships without an MLM head (mpnet-base): built (tied decoder, near-identity "
                "transform, log-unigram bias; see heads.py) or random (the library's default init, for comparison)."})
    head_warmup: int = field(default=0, metadata={
        "help": "Fit the MLM head alone for N steps (encoder frozen, a forward pass per step) before training."})
    vocab_size: int = field(default=0, metadata={"help": "Preset tokenizer vocabulary size (0: the preset's default)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout of a preset model."})
    # data
    dataset: str = field(default="wiki-vital", metadata={
        "help": "Bundled corpus (wiki-vital, austen), a local .txt/.jsonl/.csv/.parquet file or folder, "
                "or a Hugging Face dataset id[:config] such as wikitext:wikitext-2-raw-v1."})
    text_column: str = field(default="text", metadata={"help": "Column/field that holds the text."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Documents held out when the source has no validation split."})
    label_column: Optional[str] = field(default=None, metadata={
        "help": "Class-conditional training: each document becomes '<label> text' with this column's value as a "
                "protected one-token prefix (one document per block; see labels.py). Then `classify` and "
                "`generate --label` work on the model."})
    exclude_labels: list[str] = field(default_factory=list, metadata={
        "help": "With --label-column: drop the documents of these classes (e.g. Uncategorized) from both splits."})
    label_fraction: float = field(default=1.0, metadata={
        "help": "With --label-column: the share of training documents whose label is used (a label budget); the "
                "rest train with the label masked, as unlabelled text (see --unlabelled)."})
    unlabelled: str = field(default="masked", metadata={
        "help": "With --label-fraction < 1: what becomes of the documents without a label. masked: they train with "
                "the label masked (a model from scratch learns the text from them); drop: they are left out (a "
                "pretrained model that already read them then spends every step on labelled text)."})
    label_dropout: float = field(default=0.1, metadata={
        "help": "With --label-column: the share of labelled documents trained with the label masked anyway, so "
                "the model also learns p(text) (the unconditional pass of --cfg-scale guidance)."})
    label_target: float = field(default=0.0, metadata={
        "help": "With --label-column: the share of labelled rows per batch whose label token is masked and predicted "
                "too (its own draw, beside the text's level), so the model learns p(label | partly masked text) at the "
                "label slot and `classify --method label-slot` classifies in one pass; 0: the label is only a condition."})
    label_target_weight: float = field(default=10.0, metadata={
        "help": "With --label-target: how many text tokens the label's cross-entropy counts as (one label against "
                "~60 masked tokens a block)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast on a GPU or CPU (AMX) that runs it fast, else fp32), fp32, bf16, fp16; "
                "sets --bf16/--fp16 (which also work alone)."})
    eval_blocks: int = field(default=256, metadata={"help": "Validation blocks used by each evaluation."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a run already in --output-dir (only once the new run succeeds)."})
    quick_test: bool = field(default=False, metadata={
        "help": "A short CPU-sized run: 1,500 steps, evaluations every 300 steps on 128 validation blocks."})

    # -- TrainingArguments fields with this project's defaults (and help where ours says more) --------------
    output_dir: str = field(default="runs/textdiffusion", metadata={"help": "Where checkpoints, tables and plots go."})
    per_device_train_batch_size: int = field(default=16, metadata={
        "help": "Blocks per device per step.", "aliases": _alias_flags("per_device_train_batch_size")})
    per_device_eval_batch_size: Optional[int] = field(default=None, metadata={
        "help": "Blocks per device per evaluation batch (default: the training batch, at least 32)."})
    num_train_epochs: float = field(default=3.0, metadata={
        "help": "Passes over the training blocks (ignored when --max-steps > 0).",
        "aliases": _alias_flags("num_train_epochs")})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimiser steps (-1: use --epochs)."})
    learning_rate: Optional[float] = field(default=None, metadata={
        "help": "Peak learning rate (default: 5e-5 to fine-tune, 2e-3 for a preset)."})
    lr_scheduler_type: Union[SchedulerType, str] = field(default="cosine", metadata={
        "help": "The learning-rate schedule after warm-up (transformers' SchedulerType)."})
    warmup_steps: float = field(default=0.05, metadata={
        "help": "Warm-up: a fraction of the steps (< 1) or a step count.", "aliases": _alias_flags("warmup_steps")})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order and masks."})
    eval_strategy: Union[IntervalStrategy, str] = field(default="steps", metadata={
        "help": "When to evaluate (loss at each mask level, the NELBO): steps, epoch or no."})
    eval_steps: Optional[float] = field(default=500, metadata={"help": "Evaluate every N steps (loss at each mask level)."})
    save_steps: Optional[float] = field(default=None, metadata={
        "help": "Save a checkpoint every N steps (default: at every evaluation)."})
    save_total_limit: Optional[int] = field(default=2, metadata={
        "help": "Checkpoints kept in the output dir (the best one always among them)."})
    logging_steps: float = field(default=50, metadata={"help": "Log loss and tokens/s every N steps."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step too."})
    report_to: Union[None, str, list[str]] = field(default="none", metadata={
        "help": "Where to send the logs besides the console: none (default), tensorboard, wandb, ... or all."})
    # the final model is the validation-best checkpoint (NELBO, or the AR baseline's exact NLL): an AR
    # model overfits a small corpus within a few epochs, so only best points compare fairly
    load_best_model_at_end: bool = field(default=True, metadata={
        "help": "The final model is the validation-best checkpoint (by --metric-for-best-model)."})
    metric_for_best_model: Optional[str] = field(default="nll", metadata={
        "help": "nll: the validation NELBO (the AR baseline: its exact NLL), in nats/token."})
    greater_is_better: Optional[bool] = field(default=False, metadata={"help": "Whether a higher metric is better."})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "Dataloader worker processes.", "aliases": _alias_flags("dataloader_num_workers")})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Every training batch is full."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Left off: the collators need every column of a block."})
    ddp_find_unused_parameters: Optional[bool] = field(default=False, metadata={
        "help": "DDP's find_unused_parameters (off: every parameter gets a gradient)."})
    torch_compile: bool = field(default=False, metadata={
        "help": "torch.compile the model (GPU).", "aliases": _alias_flags("torch_compile")})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "Continue the run in --output-dir: from its newest complete checkpoint (--resume, or 'last'), "
                "or from one of its checkpoint-N folders.",
        "aliases": _alias_flags("resume_from_checkpoint"), "nargs": "?", "const": "last"})

    def __post_init__(self) -> None:
        CorruptionConfig.__post_init__(self)
        self.resume_from_checkpoint = _resume_value(self.resume_from_checkpoint)
        if self.quick_test:
            self.max_steps = self.max_steps if self.max_steps > 0 else QUICK_TEST["max_steps"]
            self.eval_steps = min(self.eval_steps or QUICK_TEST["eval_steps"], QUICK_TEST["eval_steps"])
            self.eval_blocks = min(self.eval_blocks, QUICK_TEST["eval_blocks"])
            self.logging_steps = min(self.logging_steps, QUICK_TEST["logging_steps"])
        checks = [
            (self.num_train_epochs > 0, "num_train_epochs", "must be > 0"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be a positive integer"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be a positive integer"),
            (self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be -1 or >= 1"),
            (self.max_length >= 8, "max_length", "must be >= 8"),
            (self.objective in OBJECTIVE_NAMES, "objective", f"must be one of {OBJECTIVE_NAMES}"),
            (self.preset is None or self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}"),
            (self.architecture in PRESET_ARCHITECTURES, "architecture", f"must be one of {PRESET_ARCHITECTURES}"),
            (self.precision in PRECISIONS, "precision", "must be auto, fp32, bf16 or fp16"),
            (self.eval_steps is None or self.eval_steps > 0, "eval_steps", "must be > 0"),
            (self.eval_blocks >= 1, "eval_blocks", "must be >= 1"),
            (self.vocab_size == 0 or self.vocab_size >= 300, "vocab_size", "must be 0 (preset default) or >= 300"),
            (self.learning_rate is None or self.learning_rate > 0, "learning_rate", "must be > 0"),
            (not (self.resume_from_checkpoint and self.overwrite), "resume_from_checkpoint",
             "cannot be combined with --overwrite"),
            (0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)"),
            (self.attention_anneal_steps is None or self.attention_anneal_steps >= 0, "attention_anneal_steps",
             "must be >= 0 (0: full attention from the start)"),
            (self.attention_anneal_steps is None or self.adapt_from_causal, "attention_anneal_steps",
             "applies only with --adapt-from-causal"),
            (not (self.adapt_from_causal and self.preset), "adapt_from_causal",
             f"adapts the causal LM given by --model-name; it cannot start from --preset {self.preset!r}"),
            (not (self.adapt_from_causal and self.objective != "diffusion"), "adapt_from_causal",
             f"trains a diffusion model; it cannot be combined with --objective {self.objective!r}"),
            (0.0 < self.label_fraction <= 1.0, "label_fraction", "must be in (0, 1]"),
            (self.unlabelled in ("masked", "drop"), "unlabelled", "must be masked or drop"),
            (0.0 <= self.label_dropout < 1.0, "label_dropout", "must be in [0, 1)"),
            (0.0 <= self.label_target <= 1.0, "label_target", "must be in [0, 1]"),
            (not self.label_target or self.label_column, "label_target", "needs --label-column (there is no label to predict)"),
            (not self.label_target or self.objective == "diffusion", "label_target",
             f"applies to the diffusion objective, not {self.objective!r}"),
            (self.label_target_weight > 0, "label_target_weight", "must be > 0"),
            (self.block_size is None or self.objective == "diffusion", "block_size",
             f"trains a diffusion model in blocks; it cannot be combined with --objective {self.objective!r}"),
            (self.block_size is None or self.block_size >= 1, "block_size", "must be >= 1"),
            (len(self.block_mask_range) == 2 and 0 < self.block_mask_range[0] < self.block_mask_range[1] <= 1,
             "block_mask_range", "must be two levels 0 < LO < HI <= 1"),
            (self.block_size is None or self.max_length % self.block_size == 0, "block_size",
             f"must divide --max-length {self.max_length} (blocks tile the sequence)"),
            (self.lora_r is None or self.lora_r >= 1, "lora_r", "must be >= 1"),
            (self.lora_r is None or (self.block_size is not None and self.adapt_from_causal), "lora_r",
             "trains adapters of a block-diffusion model: it needs --adapt-from-causal and --block-size "
             "(a masked LM or the full-attention adaptation trains every weight)"),
            (self.block_size is None or self.attention_anneal_steps in (None, 0), "attention_anneal_steps",
             "has no meaning with --block-size (attention stays causal across blocks)"),
            (self.head_init in ("built", "random"), "head_init", "must be built or random"),
            (self.head_warmup >= 0, "head_warmup", "must be >= 0"),
            (self.keep_layers >= 0, "keep_layers", "must be >= 0 (0: keep all)"),
            (not (self.preset and self.keep_layers), "keep_layers", "applies to --model-name, not to --preset"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise UsageError(f"{flag_name(name)} {rule}, got {getattr(self, name)!r}.")
        self.check_block(self.max_length)
        self._project_defaults()
        try:
            TrainingArguments.__post_init__(self)
        except ValueError as e:  # Transformers' own checks (they name the flag): one line, exit 2, as ours
            raise UsageError(" ".join(str(e).split())) from e

    def _project_defaults(self) -> None:
        """Defaults that depend on other settings, and --precision as TrainingArguments' --bf16/--fp16."""
        import torch

        if self.learning_rate is None:
            self.learning_rate = 2e-3 if self.preset else 5e-5
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = max(self.per_device_train_batch_size, 32)
        if self.save_steps is None:  # a checkpoint at every evaluation: the best one is then always on disk
            self.save_steps = self.eval_steps if self.eval_steps is not None else 500
        if self.data_seed is None:
            self.data_seed = self.seed
        if not torch.cuda.is_available():
            self.use_cpu = True
        chosen = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        if chosen and self.precision not in ("auto", chosen):
            raise UsageError(f"--precision {self.precision!r} conflicts with --{chosen}; give only one of them.")
        if chosen is None:
            flags = _precision_flags(self.precision)
            self.bf16, self.fp16 = flags.get("bf16", False), flags.get("fp16", False)
        self.precision = "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"  # what runs, for the record
        if self.fp16 and not torch.cuda.is_available():
            raise UsageError("--precision 'fp16' needs a CUDA device; on the CPU use fp32 or bf16.")

    def corruption(self) -> CorruptionConfig:
        """The corruption settings of this run, with end-of-text padding only where it applies."""
        corruption = CorruptionConfig.pick(self)
        if not self.learn_eos or self.objective != "diffusion":
            corruption.doc_end_fraction = 0.0
        if self.label_column:  # the protected prefix is [cls] <label>; every document ends its block
            from textdiffusion.core.labels import LABEL_PREFIX_LENGTH

            corruption.prefix_length = LABEL_PREFIX_LENGTH
            if corruption.random_prefix_max:
                corruption.random_prefix_max = max(corruption.random_prefix_max, LABEL_PREFIX_LENGTH)
            if corruption.learn_eos and self.objective == "diffusion":
                corruption.doc_end_fraction = 1.0
        return corruption


class TrainArgs(_TrainFields):
    """The flags of `textdiffusion train`: the corruption settings (inherited from CorruptionConfig, validated
    there), every ``transformers.TrainingArguments`` field, and the run's own. The constructor also takes
    the names in ``ALIASES`` (``TrainArgs(batch_size=8, epochs=1)``), as the flags and recipes do."""

    # what `train --help` shows (cli/help.py); `train --help-all` shows every flag, TrainingArguments' included
    HELP_SUMMARY = ("Train a masked LM (or adapt a causal LM) as a text diffusion model, from --config RECIPE and/or\n"
                    "flags. Every transformers.TrainingArguments flag works too, and older names (--batch-size).")
    HELP_GROUPS = {
        "model": ("model_name", "preset", "adapt_from_causal", "block_size", "lora_r"),
        "data": ("dataset", "text_column", "max_length", "label_column"),
        "corruption": ("mask_probs", "mask_per", "loss_weighting", "prefix_length", "learn_eos"),
        "optimisation": ("max_steps", "per_device_train_batch_size", "learning_rate", "warmup_steps", "precision",
                         "seed"),
        "evaluation and output": ("output_dir", "eval_steps", "eval_blocks", "overwrite", "resume_from_checkpoint",
                                  "quick_test"),
    }


    resolve_aliases = staticmethod(resolve_aliases)  # for the command line's --config and flags

    def __init__(self, **settings: Any) -> None:
        super().__init__(**resolve_aliases(settings))
