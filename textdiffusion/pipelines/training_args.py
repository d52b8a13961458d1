"""The settings of a training run (``textdiffusion train``'s flags): the corruption (``CorruptionConfig``),
the model to start from, the data, and the optimisation, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from textdiffusion.config import OBJECTIVE_NAMES, OBJECTIVES_WHAT, CorruptionConfig
from textdiffusion.errors import UsageError
from textdiffusion.models.presets import PRESET_ARCHITECTURES, PRESETS

RUN_ARGS_NAME = "run_args.json"


# Settings that define "the same run": --resume refuses an output dir trained with other values.
RUN_IDENTITY = ("objective", "adapt_from_causal", "model_name", "keep_layers", "preset", "architecture", "dataset",
                "text_column", "max_length", "vocab_size", "seed", "label_column")


# What --quick-test means: a CPU-sized run of the whole pipeline (about 10 minutes on 2 cores with --preset tiny).
QUICK_TEST = {"max_steps": 1500, "eval_steps": 300, "eval_blocks": 128, "logging_steps": 50}


@dataclass
class TrainArgs(CorruptionConfig):
    """The flags of `textdiffusion train`: the corruption settings (inherited from CorruptionConfig, validated
    there) and the run's own."""

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
    label_fraction: float = field(default=1.0, metadata={
        "help": "With --label-column: the share of training documents whose label is used (a label budget); the "
                "rest train with the label masked, as unlabelled text."})
    label_dropout: float = field(default=0.1, metadata={
        "help": "With --label-column: the share of labelled documents trained with the label masked anyway, so "
                "the model also learns p(text) (the unconditional pass of --cfg-scale guidance)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    # optimisation
    epochs: int = field(default=3, metadata={"help": "Passes over the training blocks (ignored when --max-steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimiser steps (-1: use --epochs)."})
    batch_size: int = field(default=16, metadata={"help": "Blocks per device per step."})
    learning_rate: Optional[float] = field(default=None, metadata={
        "help": "Peak learning rate (default: 5e-5 to fine-tune, 2e-3 for a preset)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup: float = field(default=0.05, metadata={"help": "Warm-up: a fraction of the steps (< 1) or a step count."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order and masks."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on a GPU or CPU (AMX) that runs it fast, else fp32), fp32, bf16, fp16."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (GPU)."})
    num_workers: int = field(default=0, metadata={"help": "Dataloader worker processes."})
    # evaluation, logging, checkpoints
    eval_steps: int = field(default=500, metadata={"help": "Evaluate every N steps (loss at each mask level)."})
    eval_blocks: int = field(default=256, metadata={"help": "Validation blocks used by each evaluation."})
    logging_steps: int = field(default=50, metadata={"help": "Log loss and tokens/s every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept in the output dir."})
    output_dir: str = field(default="runs/textdiffusion", metadata={"help": "Where checkpoints, tables and plots go."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a run already in --output-dir (only once the new run succeeds)."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in --output-dir from its last checkpoint."})
    quick_test: bool = field(default=False, metadata={
        "help": "A short CPU-sized run: 1,500 steps, evaluations every 300 steps on 128 validation blocks."})

    def __post_init__(self) -> None:
        super().__post_init__()  # the corruption settings
        if self.quick_test:
            self.max_steps = self.max_steps if self.max_steps > 0 else QUICK_TEST["max_steps"]
            self.eval_steps = min(self.eval_steps, QUICK_TEST["eval_steps"])
            self.eval_blocks = min(self.eval_blocks, QUICK_TEST["eval_blocks"])
            self.logging_steps = min(self.logging_steps, QUICK_TEST["logging_steps"])
        checks = [
            (self.epochs >= 1, "--epochs", self.epochs, "must be a positive integer"),
            (self.batch_size >= 1, "--batch-size", self.batch_size, "must be a positive integer"),
            (self.max_steps == -1 or self.max_steps >= 1, "--max-steps", self.max_steps, "must be -1 or >= 1"),
            (self.max_length >= 8, "--max-length", self.max_length, "must be >= 8"),
            (self.objective in OBJECTIVE_NAMES, "--objective", self.objective, f"must be one of {OBJECTIVE_NAMES}"),
            (self.preset is None or self.preset in PRESETS, "--preset", self.preset, f"must be one of {sorted(PRESETS)}"),
            (self.architecture in PRESET_ARCHITECTURES, "--architecture", self.architecture, f"must be one of {PRESET_ARCHITECTURES}"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "--precision", self.precision, "must be auto, fp32, bf16 or fp16"),
            (self.eval_steps >= 1, "--eval-steps", self.eval_steps, "must be >= 1"),
            (self.eval_blocks >= 1, "--eval-blocks", self.eval_blocks, "must be >= 1"),
            (self.vocab_size == 0 or self.vocab_size >= 300, "--vocab-size", self.vocab_size, "must be 0 (preset default) or >= 300"),
            (self.learning_rate is None or self.learning_rate > 0, "--learning-rate", self.learning_rate, "must be > 0"),
            (not (self.resume and self.overwrite), "--resume", self.resume, "cannot be combined with --overwrite"),
            (0.0 <= self.dropout < 1.0, "--dropout", self.dropout, "must be in [0, 1)"),
            (self.attention_anneal_steps is None or self.attention_anneal_steps >= 0, "--attention-anneal-steps",
             self.attention_anneal_steps, "must be >= 0 (0: full attention from the start)"),
            (self.attention_anneal_steps is None or self.adapt_from_causal, "--attention-anneal-steps",
             self.attention_anneal_steps, "applies only with --adapt-from-causal"),
            (not (self.adapt_from_causal and self.preset), "--adapt-from-causal", self.adapt_from_causal,
             f"adapts the causal LM given by --model-name; it cannot start from --preset {self.preset!r}"),
            (not (self.adapt_from_causal and self.objective != "diffusion"), "--adapt-from-causal",
             self.adapt_from_causal, f"trains a diffusion model; it cannot be combined with --objective {self.objective!r}"),
            (0.0 < self.label_fraction <= 1.0, "--label-fraction", self.label_fraction, "must be in (0, 1]"),
            (0.0 <= self.label_dropout < 1.0, "--label-dropout", self.label_dropout, "must be in [0, 1)"),
            (self.head_init in ("built", "random"), "--head-init", self.head_init, "must be built or random"),
            (self.head_warmup >= 0, "--head-warmup", self.head_warmup, "must be >= 0"),
            (self.keep_layers >= 0, "--keep-layers", self.keep_layers, "must be >= 0 (0: keep all)"),
            (not (self.preset and self.keep_layers), "--keep-layers", self.keep_layers, "applies to --model-name, not to --preset"),
        ]
        for ok, flag, value, rule in checks:
            if not ok:
                raise UsageError(f"{flag} {rule}, got {value!r}.")
        self.check_block(self.max_length)
        if self.learning_rate is None:
            self.learning_rate = 2e-3 if self.preset else 5e-5

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
