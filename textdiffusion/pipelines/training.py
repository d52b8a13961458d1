"""`textdiffusion train`: its flags (``TrainArgs``), the guards on the output folder, and the run.

    textdiffusion train --quick-test --preset tiny            # minutes on a laptop CPU
    textdiffusion train --quick-test --preset tiny --objective ar   # the GPT-2 baseline, same tokens
    textdiffusion train --config recipes/wiki-small.yaml      # a recipe: any flag from a file
    torchrun --nproc_per_node 2 -m textdiffusion train ...    # DDP, unchanged

The Trainers themselves (loss, evaluation, crash-safe checkpoints) are in train.py; this module decides
where a run writes (never over another run; --resume from the newest good checkpoint, --overwrite only
once the new run succeeds) and puts data, model, collator and Trainer together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import time
from dataclasses import fields
from pathlib import Path

import torch
from transformers import set_seed

from textdiffusion.config import CorruptionConfig, DiffusionConfig
from textdiffusion.core.collator import collator_from_config
from textdiffusion.core.data import (
    BlockDataset,
    boundary_ids,
    load_corpus,
    pack,
    unigram_cross_entropy,
    unigram_entropy,
)
from textdiffusion.core.denoiser import count_parameters
from textdiffusion.core.evaluation import scored_positions
from textdiffusion.core.labels import add_label_tokens, dropped_labels, kept_labels, label_token_ids, pack_labelled
from textdiffusion.errors import UsageError
from textdiffusion.models.adapt import base_model_record
from textdiffusion.models.checkpoints import (
    CHECKPOINT,
    checkpoint_problem,
    newest_good_checkpoint,
    remove_partial_saves,
    trainer_state,
)
from textdiffusion.models.heads import build_head, supports_head_building, warm_up_head
from textdiffusion.models.presets import PRESETS, preset_tokenizer
from textdiffusion.pipelines.objectives import OBJECTIVES, adapted_objective, block_objective, encoder_block_objective
from textdiffusion.pipelines.trainers import CURVE_CSV, LEVEL_CSV, training_arguments
from textdiffusion.pipelines.training_args import RUN_ARGS_NAME, RUN_IDENTITY, TrainArgs

logger = logging.getLogger("textdiffusion")


def verdict(results, references: dict[str, float], up_to: float = 0.9) -> str:
    """One line: how far below the context-free baselines (the lower, stricter one) the levels up to
    ``up_to`` ended."""
    bar = min(references.values())
    worst = max((r for r in results if r.mask_rate <= up_to + 1e-9), key=lambda r: r.loss)
    margin = bar - worst.loss
    status = "below" if margin > 0 else "NOT below"
    return (f"\nevery mask level <= {up_to:.1f} is {status} the unigram baselines (worst: {worst.loss:.3f} nats at "
            f"{worst.mask_rate:.1f}, baseline {bar:.3f}, margin {margin:+.3f} nats)")


# -- output-dir safety ------------------------------------------------------------------------------
def _has_checkpoint(path: Path) -> bool:
    return any(path.glob("checkpoint-*"))


def check_output_dir(args: TrainArgs) -> Path:
    """Decide where this run writes, refusing anything that would overwrite another run.

    Returns the directory to train into: ``--output-dir`` itself, or with --overwrite a staging folder
    beside it that replaces ``--output-dir`` only after the run has succeeded.
    """
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {args.output_dir!r} exists and is not a directory.")
    occupied = out.exists() and any(out.iterdir())
    if args.resume_from_checkpoint:
        if not occupied or not _has_checkpoint(out):
            raise UsageError(f"--resume: --output-dir {args.output_dir!r} holds no checkpoint to continue from.")
        saved = json.loads((out / RUN_ARGS_NAME).read_text()) if (out / RUN_ARGS_NAME).exists() else {}
        defaults = {f.name: f.default for f in fields(TrainArgs)}  # a setting added since that run had its default
        differs = {k: (saved.get(k, defaults[k]), getattr(args, k)) for k in RUN_IDENTITY
                   if saved.get(k, defaults[k]) != getattr(args, k)}
        if differs:
            raise UsageError(f"--resume: --output-dir {args.output_dir!r} holds a different run "
                             f"(saved vs now: {differs}); resume with the same settings or pick another --output-dir.")
        return out
    if occupied and not args.overwrite:
        what = "a run" if (out / RUN_ARGS_NAME).exists() or _has_checkpoint(out) else "other files"
        raise UsageError(f"--output-dir {args.output_dir!r} already holds {what}; pass --resume to continue it, "
                         "--overwrite to replace it once the new run succeeds, or choose another --output-dir.")
    if occupied:
        return out.with_name(out.name + ".partial")
    return out


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows of steps <= ``last_step`` (the first column is the step)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= last_step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def _replace_dir(staging: Path, target: Path) -> None:
    """Swap a finished staging dir into place; the old run is removed only after the swap."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)


def labelled_blocks(args: TrainArgs, corpus, tokenizer, corruption: CorruptionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation blocks of a labelled corpus, one document per block (labels.py). Training
    withholds the labels outside --label-fraction and --label-dropout of the rest (the mask token stands in);
    validation keeps every label."""
    to_id = dict(zip(corpus.label_set, label_token_ids(tokenizer, corpus.label_set)))
    n = len(corpus.train)
    kept = kept_labels(n, args.label_fraction, args.seed)
    withheld = ~kept | dropped_labels(n, args.label_dropout, args.seed)
    train_ids = [None if w else to_id[c] for c, w in zip(corpus.train_labels, withheld)]
    texts = corpus.train
    if args.unlabelled == "drop":  # only the documents of the label budget train
        texts = [t for t, k in zip(texts, kept) if k]
        train_ids = [i for i, k in zip(train_ids, kept) if k]
    pad_with_eos = corruption.learn_eos or args.objective != "diffusion"
    train, _ = pack_labelled(texts, train_ids, tokenizer, args.max_length, tokenizer.mask_token_id, pad_with_eos)
    val, _ = pack_labelled(corpus.validation, [to_id[c] for c in corpus.validation_labels], tokenizer, args.max_length,
                           tokenizer.mask_token_id, pad_with_eos)
    rest = "the rest are left out" if args.unlabelled == "drop" else "the rest train with it masked"
    print(f"labels: {len(to_id)} classes of {args.label_column!r}; {int((~withheld).sum()):,} of {n:,} training documents "
          f"carry their label, {rest}", flush=True)
    return train, val
def _prepare_head(args: TrainArgs, model, tokenizer, train_blocks, corruption, device, is_main: bool) -> None:
    """Build the MLM head of an encoder shipped without one, and warm it up with the encoder frozen."""
    missing = getattr(model, "missing_head_keys", [])
    if args.head_warmup and not supports_head_building(model):
        raise UsageError(f"--head-warmup {args.head_warmup}: not supported for a {model.config.model_type!r} model.")
    if (missing and args.head_init == "built") or args.head_warmup:
        model.to(device)  # where Trainer will put it anyway: the encoder's forward passes below run there
    if missing and args.head_init == "built":
        fit = build_head(model, train_blocks, tokenizer, seed=args.seed)
        if is_main:
            print(f"head: {args.model_name} has no MLM head ({len(missing)} weights missing); built one: masked loss on "
                  f"{fit['positions']} training positions {fit['random_head_loss']:.3f} (random head) -> "
                  f"{fit['built_head_loss']:.3f} nats (logit scale {fit['logit_scale']:.2f}, unigram weight "
                  f"{fit['unigram_weight']:.2f})", flush=True)
    elif missing and is_main:
        print(f"head: {args.model_name} has no MLM head ({len(missing)} weights missing); left random (--head-init random)",
              flush=True)
    if args.head_warmup:
        warm_collator = collator_from_config(tokenizer, corruption, seed=args.seed + 1)  # the run's mask stream untouched
        started = time.perf_counter()
        losses = warm_up_head(model, train_blocks, warm_collator, args.head_warmup, args.per_device_train_batch_size,
                              seed=args.seed,
                              log_every=max(1, args.head_warmup // 5) if is_main else 0)
        if is_main:
            print(f"head warm-up: {args.head_warmup} steps with the encoder frozen, masked loss "
                  f"{losses[0]:.3f} -> {losses[-1]:.3f} (mean of the last 10: {sum(losses[-10:]) / len(losses[-10:]):.3f}), "
                  f"{time.perf_counter() - started:.1f} s", flush=True)


def tokens_per_step(training_args, max_length: int) -> int:
    """Tokens one optimiser step trains on: blocks per device x accumulated batches x devices x block length."""
    return (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * training_args.world_size * max_length)


def resume_point(args: TrainArgs, run_dir: Path) -> Path:
    """The checkpoint --resume continues from: the newest complete one ("last"), or the checkpoint-N of
    this run that --resume_from_checkpoint names."""
    if args.resume_from_checkpoint == "last":
        found = newest_good_checkpoint(run_dir)
        if found is None:
            raise UsageError(f"--resume: no checkpoint in --output-dir {args.output_dir!r} is complete and readable; "
                             "start again with --overwrite.")
        return found
    given = Path(args.resume_from_checkpoint)
    if not given.is_absolute() and len(given.parts) == 1:  # a bare checkpoint-N: of this run
        given = run_dir / given
    if given.resolve().parent != run_dir.resolve() or not CHECKPOINT.match(given.name):
        raise UsageError(f"--resume-from-checkpoint {args.resume_from_checkpoint!r} is not a checkpoint-N folder of "
                         f"--output-dir {args.output_dir!r}; give one of its checkpoints, or 'last'.")
    problem = checkpoint_problem(given) if given.is_dir() else "no such folder"
    if problem:
        raise UsageError(f"--resume-from-checkpoint {args.resume_from_checkpoint!r} cannot be used: {problem}.")
    return run_dir / given.name


def _no_space(error: BaseException) -> bool:
    """True for a write that failed because the disk is full (torch.save reports it as a RuntimeError)."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error) \
                or "failed writing file" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_is_one_line(args: TrainArgs, work_dir: Path, model) -> None:
    """A full disk while a checkpoint is saved ends the run with one line that names the folder, the space needed,
    the last good checkpoint and --resume, not a torch traceback (the partial save never replaces a good one:
    checkpoints are written aside and renamed when complete)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not _no_space(e):
            raise
        last = newest_good_checkpoint(work_dir)
        if last is not None:
            need = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
        else:  # weights, and the optimiser's two moments of every trained weight
            need = sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in model.parameters())
        free = shutil.disk_usage(work_dir).free
        where = (f"the last good checkpoint is {last} (intact): free space, then rerun with --resume" if last is not None
                 else "no checkpoint was complete yet: free space and start again")
        raise UsageError(f"--output-dir {args.output_dir!r}: the disk is full (no space left on device) while saving; "
                         f"a checkpoint needs about {need / 2**20:,.0f} MB and {free / 2**20:,.0f} MB are free; "
                         f"{where}.") from None


def run_training(args: TrainArgs) -> Path:
    """Train as ``args`` says; returns the output dir holding the final model."""
    final_dir = Path(args.output_dir)
    work_dir = check_output_dir(args)  # validated before anything is written
    resume_from, resumed_step = None, 0
    if args.resume_from_checkpoint:
        remove_partial_saves(work_dir)
        resume_from = resume_point(args, work_dir)  # still before anything is written
        state = trainer_state(resume_from)
        resumed_step = int(state["global_step"])
        target = args.max_steps if args.max_steps > 0 else int(state.get("max_steps", 0))
        if resumed_step >= target and (work_dir / "model.safetensors").exists():
            print(f"--resume: the run in {args.output_dir} already finished ({resumed_step} of {target} steps); "
                  "nothing to do.", flush=True)
            return final_dir
    training_args = training_arguments(args, work_dir)
    is_main = training_args.process_index == 0
    if is_main and work_dir != final_dir and work_dir.exists():
        shutil.rmtree(work_dir)  # the staging dir of an earlier --overwrite run that failed
    if training_args.world_size > 1:
        torch.distributed.barrier()
    set_seed(args.seed)

    if args.block_size and args.adapt_from_causal:
        objective = block_objective(args.block_size, args.lora_r, args.complementary_masks,
                                    tuple(args.block_mask_range))
    elif args.block_size:
        objective = encoder_block_objective(args.block_size, args.complementary_masks, args.prefix_length,
                                            tuple(args.block_mask_range))
    elif args.adapt_from_causal:
        objective = adapted_objective(args.attention_anneal_steps)
    else:
        objective = OBJECTIVES[args.objective]
    corpus = load_corpus(args.dataset, args.text_column, args.validation_fraction, label_column=args.label_column)
    if args.exclude_labels:
        corpus = corpus.without_labels(args.exclude_labels, "--exclude-labels")
    if args.preset:
        vocab = args.vocab_size or PRESETS[args.preset].vocab_size
        with training_args.main_process_first(desc="tokenizer"):
            work_dir.mkdir(parents=True, exist_ok=True)
            tokenizer = preset_tokenizer(corpus.train, vocab, work_dir / "tokenizer")
        if args.label_column:  # the labels' tokens exist before the model is built for this tokenizer
            add_label_tokens(tokenizer, corpus.label_set)
        model = objective.build(args.preset, tokenizer, args.max_length, args.dropout, args.architecture)
    else:
        tokenizer, model = objective.load(args.model_name)
        if args.keep_layers:
            from textdiffusion.models.loading import keep_first_layers

            keep_first_layers(model, args.keep_layers)
    label_set = corpus.label_set if args.label_column else None
    if label_set:  # one special token per label, added before the collator reads the special tokens
        add_label_tokens(tokenizer, label_set)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):  # a pretrained model: new rows
            # drawn like the initial weights; mean-resizing would start every label at the same embedding
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    trained = objective.prepare(tokenizer, model)  # the module Trainer/Accelerate wrap (diffusion: the denoiser)
    corruption = args.corruption()
    label_target = dict(label_target=args.label_target, label_target_weight=args.label_target_weight,
                        label_token_ids=label_token_ids(tokenizer, label_set)) if label_set and args.label_target else {}
    collator = collator_from_config(tokenizer, corruption, seed=args.seed + 7919 * training_args.process_index,
                                    gather_buckets=8 if args.torch_compile else 0, **label_target)

    if label_set:
        train_blocks, val_blocks = labelled_blocks(args, corpus, tokenizer, corruption)
    else:
        train_blocks = pack(corpus.train, tokenizer, args.max_length, doc_end_fraction=corruption.doc_end_fraction,
                            seed=args.seed)
        val_blocks = pack(corpus.validation, tokenizer, args.max_length, keep_remainder=True)
    batch = args.per_device_train_batch_size
    if len(train_blocks) < batch * training_args.world_size:
        raise UsageError(f"--dataset {args.dataset!r} gives {len(train_blocks)} training block(s) of "
                         f"{args.max_length} tokens: fewer than one batch (--batch-size {batch}).")
    val_eval = val_blocks[: args.eval_blocks]
    cls, sep = boundary_ids(tokenizer)
    special = list(tokenizer.all_special_ids)
    references = {  # what a model that ignores context scores: the bar every mask level must clear
        "unigram entropy of the validation tokens": unigram_entropy(val_blocks, special),
        "unigram cross-entropy (training-set token frequencies)": unigram_cross_entropy(train_blocks, val_eval, special),
    }
    if is_main:
        print(f"data: {args.dataset}: {len(corpus.train):,} train / {len(corpus.validation):,} validation documents -> "
              f"{len(train_blocks):,} train / {len(val_blocks):,} validation blocks of {args.max_length} tokens", flush=True)
        print(f"model: {args.preset and 'preset ' + args.preset or args.model_name} ({model.config.model_type}, "
              f"{count_parameters(model) / 1e6:.1f}M parameters, vocab {len(tokenizer):,}), "
              f"{training_args.world_size} process(es) on {training_args.device.type}", flush=True)

    if resume_from is None:  # a resumed run's checkpoint holds its trained head
        _prepare_head(args, model, tokenizer, train_blocks, corruption, training_args.device, is_main)

    config = DiffusionConfig(objective=args.objective, max_length=args.max_length, mask_token_id=tokenizer.mask_token_id,
                             cls_token_id=cls, sep_token_id=sep, corruption=corruption,
                             adapted_from_causal=args.adapt_from_causal, labels=label_set,
                             block_size=args.block_size, base_model=base_model_record(args.model_name) if args.lora_r else None,
                             label_column=args.label_column if label_set else None,
                             label_target=args.label_target if label_set else 0.0)
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / RUN_ARGS_NAME).write_text(json.dumps(args.to_dict(), indent=2) + "\n")  # tokens redacted
        (work_dir / "references.json").write_text(json.dumps(references, indent=2) + "\n")

    # validation scores the tokens it always scored (end-of-text is conditioned on, not scored), so numbers
    # stay comparable across runs and with the AR baseline; end_of_text_at_document_ends measures the stops
    eval_collator = collator_from_config(tokenizer, corruption, training=False)
    level_eval = {"blocks": val_eval, "collator": eval_collator, "report_dir": str(work_dir), "references": references,
                  "title": f"{args.preset or args.model_name} on {args.dataset}",
                  # the tokens the NELBO scores (after the prefix, not special): the AR baseline is scored on these
                  "scored": scored_positions(val_eval, tokenizer, corruption.prefix_length)}
    common = dict(model=trained, args=training_args, train_dataset=BlockDataset(train_blocks),
                  eval_dataset=BlockDataset(val_eval), processing_class=tokenizer, diffusion_config=config,
                  tokens_per_step=tokens_per_step(training_args, args.max_length), level_eval=level_eval)
    trainer = objective.trainer(tokenizer, collator, args.loss_weighting, **common)
    if resume_from is None:
        trainer.evaluate()  # step 0: the "before" row every level must improve on
    else:  # the mask stream continues where it was (trainers.ResumedMaskStream)
        if is_main:  # drop rows an interrupted run logged after its last complete checkpoint
            for name in (LEVEL_CSV, CURVE_CSV):
                _truncate_csv(work_dir / name, resumed_step)
        print(f"resuming from {resume_from} (step {resumed_step})", flush=True)
    with disk_full_is_one_line(args, work_dir, trained):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)  # evaluates, saves the last step
        trainer.save_model(str(work_dir))
    if is_main:
        config.save_pretrained(work_dir)
    if training_args.world_size > 1:
        torch.distributed.barrier()
    if args.push_to_hub:  # the final model with its diffusion config and reports (Trainer pushes from rank 0)
        trainer.push_to_hub()
    if is_main and work_dir != final_dir:
        _replace_dir(work_dir, final_dir)
    if is_main:
        best = trainer.state.best_model_checkpoint
        best_step = int(best.rsplit("-", 1)[1]) if best else trainer.state.global_step
        if best_step in trainer.level_results:
            print(verdict(trainer.level_results[best_step], references))
        print(f"best validation {objective.bound}: {trainer.state.best_metric:.4f} "
              f"nats/token at {Path(best).name if best else 'the last step'}; that model is the final one", flush=True)
        print(f"done: model, {objective.outputs} are in {final_dir}/", flush=True)
    return final_dir
