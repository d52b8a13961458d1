"""`textdiffusion experiment repeated-data`: diffusion against the same-size AR model when data is scarce.

    textdiffusion experiment repeated-data --output-dir benchmarks/results/repeated_data
    textdiffusion experiment repeated-data --dataset my_corpus.jsonl --budgets 50000 200000

The question a user with a small corpus has: which model extracts more from the same U unique tokens when
both may see them many times? (Prabhudesai et al. 2025 find masked diffusion ahead past a critical compute
that grows with U; Ni et al. 2025 find the same from other angles.) For each budget U (the first U tokens
of one shuffled packing of the training split) this trains, from scratch and with the same preset size,
tokenizer, blocks, batch, optimiser and schedule shape:

* the diffusion model on its own bound (continuous-time ELBO weighting, one mask level per example),
  evaluated by its NELBO bound (``core.evaluation.nelbo``, exact-k, fixed masks: paired across epochs);
* the GPT-2 of the same width and depth (``models.autoregressive``), evaluated by its exact NLL on the
  same tokens, with the regularisers that delay its overfitting (dropout, weight decay) and several
  schedule horizons (a cosine that ends where AR is at its best is AR's best case);
* with ``--block-side-sizes B``, a third side between the two: the same ModernBERT as a block diffusion
  model (BD3-LM, ``models.block``: causal across blocks of B, masked diffusion inside one), trained on its
  block NELBO and judged by it, with the diffusion side's learning rates and its own dropout and weight decay
  grids (it overfits like AR).

Each side sweeps its peak learning rate; every run evaluates on a validation split as it trains and stops
once the validation loss has not improved for ``--patience`` evaluations. Each side's best run is chosen
on validation and reported on a separate test split (choosing the best of many noisy estimates on the
reported tokens would flatter the noisier side), with the paired per-block difference and its standard
error. A short loop written here rather than ``Trainer``: dozens of small runs that evaluate by epoch and
resume mid-run from one file each; both sides go through the same loop, which is what fairness needs.

Resumable: each run keeps ``state.pt`` (weights, optimiser, schedule, curve) after every evaluation and its
best model as a checkpoint folder (``generate``/``eval`` load it); a finished run writes ``done.json``. The
experiment's staging folder survives an error or an interrupt, and the same command continues it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from textdiffusion.config import CorruptionConfig, DiffusionConfig
from textdiffusion.core.collator import collator_from_config
from textdiffusion.core.data import load_corpus, pack
from textdiffusion.core.evaluation import BoundResult, nelbo, scored_positions, weighted_mean
from textdiffusion.errors import UsageError
from textdiffusion.models.autoregressive import causal_nll
from textdiffusion.models.block import (
    EncoderBlockDiffusionLM,
    block_loss,
    block_nelbo,
    block_nelbo_per_block,
    check_block_size,
    scoring_corruption,
)
from textdiffusion.models.presets import PRESETS, preset_tokenizer
from textdiffusion.pipelines.objectives import OBJECTIVES

SIDES = ("diffusion", "block", "ar")
PREFIX = 1  # position 0 is given to both sides (nothing predicts it autoregressively); all later tokens are scored
ARGS_FILE = "experiment_args.json"
# what gives every run of a folder its meaning: a resumed folder must match these. The grid itself (budgets,
# rates, horizons, regularisers) may change between invocations: a run's folder name says which point it is,
# so a larger grid reuses the runs it shares with a smaller one
IDENTITY = ("dataset", "text_column", "preset", "vocab_size", "max_length", "batch_size", "patience", "evals",
            "validation_blocks", "nelbo_samples", "seed")


@dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    side: str
    budget: int  # unique training tokens
    learning_rate: float
    epochs: int  # the schedule's horizon (training may stop earlier: --patience)
    dropout: float = 0.0
    weight_decay: float = 0.1
    input_noise: float = 0.0  # AR only: share of input tokens replaced by random ones (targets unchanged)
    block_size: int = 0  # block side only: tokens per block

    @property
    def name(self) -> str:
        side = f"block{self.block_size}" if self.side == "block" else self.side
        name = f"U{self.budget}-{side}-lr{self.learning_rate:g}-e{self.epochs}-drop{self.dropout:g}-wd{self.weight_decay:g}"
        return name + (f"-noise{self.input_noise:g}" if self.input_noise else "")


# -- data -------------------------------------------------------------------------------------------
@dataclass
class Data:
    tokenizer: object
    train: torch.Tensor  # [n, l] every training block, in one shuffled order: a budget takes the first ones
    validation: torch.Tensor  # [v, l] model selection
    test: torch.Tensor  # [t, l] the reported numbers


def prepare_data(args, folder: Path) -> Data:
    """One tokenizer (trained once on the training split, cached in ``folder``), the training blocks in one
    seeded order, and the validation documents halved into a validation and a test split."""
    corpus = load_corpus(args.dataset, args.text_column)
    tokenizer = preset_tokenizer(corpus.train, args.vocab_size, folder / "tokenizer")
    g = torch.Generator().manual_seed(args.seed)
    docs = [corpus.train[i] for i in torch.randperm(len(corpus.train), generator=g).tolist()]
    train = pack(docs, tokenizer, args.max_length)
    order = torch.randperm(len(corpus.validation), generator=g).tolist()
    half = len(order) // 2
    if half < 1:
        raise UsageError(f"--dataset {args.dataset!r} has {len(corpus.validation)} validation document(s); "
                         "at least 2 are needed (one for validation, one for test).")
    validation = pack([corpus.validation[i] for i in order[:half]], tokenizer, args.max_length, keep_remainder=True)
    test = pack([corpus.validation[i] for i in order[half:]], tokenizer, args.max_length, keep_remainder=True)
    if args.quick:  # the smoke run scores a few test blocks, not half the validation split
        test = test[: 4 * args.validation_blocks]
    return Data(tokenizer, train, validation[: args.validation_blocks], test)


def budget_blocks(data: Data, budget: int, args) -> torch.Tensor:
    n = budget // args.max_length
    available = data.train.numel()
    if n > len(data.train):  # the last partial block of a budget is not used: a budget's own blocks suffice
        raise UsageError(f"--budgets {budget}: larger than the corpus ({available:,} training tokens of "
                         f"{args.dataset!r} with this tokenizer).")
    if n < args.batch_size:
        raise UsageError(f"--budgets {budget}: {n} block(s) of {args.max_length} tokens, fewer than one batch "
                         f"(--batch-size {args.batch_size}).")
    return data.train[:n]


# -- one run ----------------------------------------------------------------------------------------
def block_corruption(tokenizer, block_size: int):
    """The block side's training draws: a level per block (BD3-LM), one mask per row (no complementary copy: an
    epoch costs ~2.5x the diffusion side's with the clean copy beside the noisy one, twice that with it); the
    same given first token and unscored special tokens as the other two sides."""
    return scoring_corruption(tokenizer, block_size, causal=False, prefix_length=PREFIX).like(complementary=False)


def corruption() -> CorruptionConfig:
    """The diffusion side trains on the bound it is judged by: MDLM's continuous-time ELBO weighting, a level
    per example, stratified over the batch."""
    return CorruptionConfig(time_sampling="stratified", mask_per="example", loss_weighting="elbo", prefix_length=PREFIX,
                            learn_eos=False)  # packed blocks: end-of-text is conditioned on, as AR's scoring leaves it


def eval_epochs(epochs: int, evals: int) -> list[int]:
    """When a run evaluates: each of the first epochs (AR's best is often there), then evenly spaced."""
    every = max(1, epochs // max(1, evals))
    return sorted({e for e in (1, 2, 3, 4, 6, 8) if e <= epochs} | set(range(every, epochs + 1, every)) | {epochs})


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then a cosine from the peak down to a tenth of it at ``total`` (both sides)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(module, run: Run) -> torch.optim.Optimizer:
    """AdamW; matrices decay, biases and norms do not (the usual rule)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": run.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=run.learning_rate, betas=(0.9, 0.95))


class Side:
    """What differs between the sides: the model, its loss and its validation number."""

    def __init__(self, run: Run, tokenizer, args):
        from textdiffusion.pipelines.generation import resolve_device

        self.run, self.tokenizer, self.device = run, tokenizer, resolve_device(args.device)
        objective = OBJECTIVES["diffusion" if run.side == "block" else run.side]
        self.model = objective.build(args.preset, tokenizer, args.max_length, run.dropout, "modernbert")
        if run.side == "block":
            self.trained = EncoderBlockDiffusionLM(self.model, run.block_size).to(self.device)
            self.collator = block_corruption(tokenizer, run.block_size).like(seed=args.seed)
            self.eval_collator = scoring_corruption(tokenizer, run.block_size, causal=False, prefix_length=PREFIX)
            return
        self.trained = objective.prepare(tokenizer, self.model).to(self.device)
        self.collator = collator_from_config(tokenizer, corruption(), seed=args.seed)
        self.eval_collator = collator_from_config(tokenizer, corruption(), training=False)

    def loss(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.run.side != "ar":
            from textdiffusion.core.loss import diffusion_loss

            batch = {k: v.to(self.device) for k, v in self.collator(blocks).items()}
            loss = block_loss if self.run.side == "block" else diffusion_loss
            return loss(self.trained, batch, "elbo")  # each trains on the bound it is judged by
        inputs = blocks
        if self.run.input_noise:  # Gao et al. 2025: noised inputs are much of what makes diffusion data-efficient
            noise = torch.rand(blocks.shape) < self.run.input_noise
            inputs = torch.where(noise, torch.randint_like(blocks, len(self.tokenizer)), blocks)
        return self.model(input_ids=inputs.to(self.device), labels=blocks.to(self.device)).loss

    def evaluate(self, blocks: torch.Tensor, samples: int) -> BoundResult:
        if self.run.side == "diffusion":
            return nelbo(self.trained, blocks, self.eval_collator, "exact-k", samples_per_block=samples, seed=1234)
        if self.run.side == "block":
            # exact-k draws: as many as the block has tokens visit every k of a block once
            draws = max(samples, self.run.block_size)
            return block_nelbo(self.trained, blocks, self.eval_collator, samples_per_block=draws, seed=1234)
        return causal_nll(self.model, blocks, scored_positions(blocks, self.tokenizer, PREFIX))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_best(side: Side, run_dir: Path, epoch: int, max_length: int) -> str:
    """The best model so far as a loadable checkpoint folder ``best-EPOCH``; older ones go once the state
    file points at the new one (see ``train_run``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per evaluation would bury the curve
    folder = run_dir / f"best-{epoch}"
    if folder.exists():
        shutil.rmtree(folder)
    side.model.save_pretrained(folder)
    side.tokenizer.save_pretrained(folder)
    tok = side.tokenizer
    block = side.run.side == "block"
    DiffusionConfig(objective="diffusion" if block else side.run.side, max_length=max_length,
                    mask_token_id=tok.mask_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                    corruption=corruption(), block_size=side.run.block_size if block else None).save_pretrained(folder)
    return folder.name


def train_run(run: Run, data: Data, args, run_dir: Path) -> dict:
    """Train one run to its horizon or until --patience evaluations without a new best; resumes from
    ``state.pt``. Returns the finished run's record (also written to ``done.json``)."""
    done = run_dir / "done.json"
    if done.exists():
        record = json.loads(done.read_text())
        if (run_dir / str(record.get("best_dir"))).is_dir():
            return record
        print(f"  {run.name}: finished, but its best model is gone (a copy without models?): training it again",
              flush=True)
        done.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    blocks = budget_blocks(data, run.budget, args)
    torch.manual_seed(args.seed)
    side = Side(run, data.tokenizer, args)
    optimizer = _optimizer(side.trained, run)
    steps_per_epoch = len(blocks) // args.batch_size
    total = run.epochs * steps_per_epoch
    warmup = max(1, min(steps_per_epoch, total // 20))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    params = sum(p.numel() for p in side.model.parameters())
    state = {"epoch": 0, "curve": [], "best": None, "best_dir": None, "since_best": 0, "train_s": 0.0, "eval_s": 0.0}
    if (run_dir / "state.pt").exists():
        saved = torch.load(run_dir / "state.pt", weights_only=False, map_location=side.device)
        side.model.load_state_dict(saved["model"])  # the model is on its device already: the state follows it
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = saved["state"]
        print(f"  {run.name}: resuming after epoch {state['epoch']}", flush=True)
    checkpoints = set(eval_epochs(run.epochs, args.evals))
    side.trained.train()
    for epoch in range(state["epoch"] + 1, run.epochs + 1):
        started = time.process_time()
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        torch.manual_seed(args.seed * 104_729 + epoch)  # dropout: the same stream after a resume
        side.collator.reseed(args.seed, batch_offset=(epoch - 1) * steps_per_epoch)
        for s in range(steps_per_epoch):
            loss = side.loss(blocks[order[s * args.batch_size:(s + 1) * args.batch_size]])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(side.trained.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        state["train_s"] += time.process_time() - started
        state["epoch"] = epoch
        if epoch not in checkpoints:
            continue
        started = time.process_time()
        result = side.evaluate(data.validation, args.nelbo_samples)
        side.trained.train()
        state["eval_s"] += time.process_time() - started
        tokens = epoch * steps_per_epoch * args.batch_size * args.max_length
        state["curve"].append({"epoch": epoch, "tokens": tokens, "flops": 6 * params * tokens,
                               "validation": result.nats_per_token, "stderr": result.stderr,
                               "train_loss": loss.item()})
        stale = state["best_dir"]
        if state["best"] is None or result.nats_per_token < state["best"]["validation"]:
            state["best"] = {"epoch": epoch, "validation": result.nats_per_token, "stderr": result.stderr}
            state["best_dir"], state["since_best"] = _save_best(side, run_dir, epoch, args.max_length), 0
        else:
            state["since_best"] += 1
        _atomic_save({"model": side.model.state_dict(), "optimizer": optimizer.state_dict(),
                      "schedule": schedule.state_dict(), "state": state}, run_dir / "state.pt")
        if stale and stale != state["best_dir"]:
            shutil.rmtree(run_dir / stale, ignore_errors=True)
        print(f"  {run.name}: epoch {epoch}, validation {result.nats_per_token:.4f} ± {result.stderr:.4f}"
              f" (best {state['best']['validation']:.4f} at {state['best']['epoch']})", flush=True)
        if state["since_best"] >= args.patience:
            break
    record = {"run": asdict(run), "name": run.name, "parameters": params, "blocks": len(blocks),
              "stopped_at_epoch": state["epoch"], "best": state["best"], "best_dir": state["best_dir"],
              "curve": state["curve"], "train_s": state["train_s"], "eval_s": state["eval_s"]}
    done.write_text(json.dumps(record, indent=2) + "\n")
    (run_dir / "state.pt").unlink(missing_ok=True)  # the finished run keeps its curve and best model
    return record


# -- the experiment ---------------------------------------------------------------------------------
def grid(args) -> list[Run]:
    """Every run, budget by budget, AR first (cheaper, and its best sets the bar diffusion must pass)."""
    runs = []
    for budget in args.budgets:
        runs += [Run("ar", budget, lr, epochs, dropout, wd, noise) for lr in args.ar_learning_rates
                 for epochs in args.ar_epochs for dropout in args.ar_dropout for wd in args.ar_weight_decay
                 for noise in args.ar_input_noise]
        runs += [Run("diffusion", budget, lr, epochs, dropout, args.weight_decay) for lr in args.learning_rates
                 for epochs in args.epochs for dropout in args.dropout]
        runs += [Run("block", budget, lr, epochs, dropout, wd, block_size=b)
                 for b in args.block_side_sizes for lr in args.learning_rates
                 for epochs in (args.block_epochs or args.epochs) for dropout in (args.block_dropout or args.dropout)
                 for wd in (args.block_weight_decay or [args.weight_decay])]
    return runs


def check_args(args) -> None:
    """The experiment's own flags, before anything is loaded or trained (one line each)."""
    lists = {"budgets": args.budgets, "epochs": args.epochs, "ar_epochs": args.ar_epochs, "learning_rates": args.learning_rates,
             "ar_learning_rates": args.ar_learning_rates, "dropout": args.dropout, "ar_dropout": args.ar_dropout,
             "ar_weight_decay": args.ar_weight_decay, "ar_input_noise": args.ar_input_noise}
    for name, values in lists.items():
        if not values:
            raise UsageError(f"--{name.replace('_', '-')} needs at least one value.")
    for name in ("budgets", "epochs", "ar_epochs", "block_epochs"):
        for v in getattr(args, name):
            if v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}.")
    for name in ("learning_rates", "ar_learning_rates"):
        for v in getattr(args, name):
            if not v > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {v}.")
    for name in ("dropout", "ar_dropout", "ar_input_noise", "block_dropout"):
        for v in getattr(args, name):
            if not 0.0 <= v < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}.")
    for v in [args.weight_decay, *args.ar_weight_decay, *args.block_weight_decay]:
        if v < 0:
            raise UsageError(f"--weight-decay/--ar-weight-decay/--block-weight-decay must be >= 0, got {v}.")
    for b in args.block_side_sizes:
        check_block_size(b, args.max_length, "--block-side-sizes")
    if args.preset not in PRESETS:
        raise UsageError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}.")
    for name in ("patience", "evals", "validation_blocks", "vocab_size", "workers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")


def _check_same_experiment(args, folder: Path) -> None:
    """A folder being resumed must hold the same experiment: other settings would mix two grids."""
    path = folder / ARGS_FILE
    mine = {k: getattr(args, k) for k in IDENTITY}
    if path.exists():
        theirs = json.loads(path.read_text())
        changed = [k for k in IDENTITY if json.dumps(theirs.get(k)) != json.dumps(mine[k])]
        if changed:
            k = changed[0]
            raise UsageError(f"--{k.replace('_', '-')} {mine[k]!r} differs from the unfinished experiment in "
                             f"{str(folder)!r} ({theirs.get(k)!r}); rerun with its settings to resume, or delete it.")
    else:
        path.write_text(json.dumps(mine, indent=2) + "\n")


def test_estimate(record: dict, folder: Path, data: Data, args) -> dict:
    """A fresh estimate of a best model on the test split, with its per-block values (for paired errors)."""
    from textdiffusion.core.evaluation import nelbo_per_block
    from textdiffusion.models.autoregressive import causal_nll_per_block, load_causal_lm
    from textdiffusion.models.loading import open_checkpoint
    from textdiffusion.pipelines.generation import resolve_device

    checkpoint = folder / record["name"] / record["best_dir"]
    blocks, device, side = data.test, resolve_device(args.device), record["run"]["side"]
    if side == "ar":
        tokenizer, model = load_causal_lm(str(checkpoint))
        per_block, weights = causal_nll_per_block(model.to(device), blocks, scored_positions(blocks, tokenizer, PREFIX))
    else:
        opened = open_checkpoint(str(checkpoint))
        denoiser = opened.denoiser.to(device)
        if side == "block":
            b = record["run"]["block_size"]
            scoring = scoring_corruption(opened.tokenizer, b, causal=False, prefix_length=PREFIX)
            per_block, weights = block_nelbo_per_block(denoiser, blocks, scoring,
                                                       samples_per_block=max(8, args.nelbo_samples, b), seed=4321)
        else:
            collator = collator_from_config(opened.tokenizer, corruption(), training=False)
            per_block, weights = nelbo_per_block(denoiser, blocks, collator, samples_per_block=max(8, args.nelbo_samples),
                                                 seed=4321)
    mean, stderr = weighted_mean(per_block, weights)
    return {"test": mean, "test_stderr": stderr, "per_block": per_block.tolist(), "weights": weights.tolist()}


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """Mean and standard error of (a - b) per token over the same test blocks (token-weighted, paired)."""
    wa, wb = torch.tensor(a["weights"], dtype=torch.float64), torch.tensor(b["weights"], dtype=torch.float64)
    if not torch.equal(wa, wb):
        raise RuntimeError("the two sides scored different tokens; the comparison would be meaningless")
    d = torch.tensor(a["per_block"], dtype=torch.float64) - torch.tensor(b["per_block"], dtype=torch.float64)
    return weighted_mean(d, wa)


def generation_rows(bests: dict, folder: Path, data: Data, args) -> list[dict]:
    """Gen PPL and distinct-2 of each side's best model on the same prompts (test split, same seeds)."""
    from textdiffusion.models.autoregressive import CausalGenerator
    from textdiffusion.models.quality import (
        Scorer,
        causal_continuations,
        diffusion_continuations,
        prompts_from_documents,
        quality_row,
        reference_row,
    )
    from textdiffusion.pipelines.generation import DiffusionGenerator, resolve_device

    device = resolve_device(args.device)
    scorer = None if args.scorer == "none" else Scorer.load(args.scorer, device)
    docs = [data.tokenizer.decode(b, skip_special_tokens=True) for b in data.test]
    prompts = prompts_from_documents(docs, data.tokenizer, args.num_prompts, args.prompt_tokens, args.new_tokens,
                                     args.dataset)
    rows = [reference_row(prompts, data.tokenizer, scorer)]
    for (budget, side), record in sorted(bests.items()):
        checkpoint = str(folder / record["name"] / record["best_dir"])
        label = f"U={budget:,}: {side} (best, epoch {record['best']['epoch']})"
        if side != "ar":
            gen = DiffusionGenerator.from_pretrained(checkpoint, device=str(device))
            out = diffusion_continuations(gen, prompts, args.new_tokens, seed=args.seed, steps=args.new_tokens)
        else:
            gen = CausalGenerator.from_pretrained(checkpoint, device)
            out = causal_continuations(gen, prompts, args.new_tokens, seed=args.seed)
        rows.append({**quality_row(label, prompts, out.new_ids, data.tokenizer, scorer, out.texts, out.nfe),
                     "budget": budget, "side": side})
    return rows


def _die_with_parent() -> None:
    """Linux: end this worker when the experiment's process dies (killed, not only interrupted), so no orphan
    keeps training a run that the next invocation resumes at the same time."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere a killed parent leaves its workers to finish the run they are on


def _pin_worker(cores, lock) -> None:
    """Each worker process takes one core of its own and one thread (two 2-thread jobs on 2 cores run several
    times slower than one after the other)."""
    _die_with_parent()
    with lock:
        core = cores.pop(0) if len(cores) else None
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _for_budget(data: Data, budget: int, args) -> Data:
    """What a worker needs of the data for one budget: its blocks, not the whole packed corpus (sent to a worker
    instead of each worker loading and packing the corpus again)."""
    return Data(data.tokenizer, budget_blocks(data, budget, args), data.validation, data.test)


def train_grid(runs: list[Run], data: Data, args, out: Path) -> list[dict]:
    """Every run, in this process or in ``--workers`` processes (runs are independent; the longest start first)."""
    if args.workers <= 1:
        records = []
        for run in runs:
            print(f"run {run.name}", flush=True)
            records.append(train_run(run, data, args, out / run.name))
        return records
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    manager = context.Manager()
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores, lock = manager.list(allowed[: args.workers] if len(allowed) >= args.workers else []), manager.Lock()
    cost = {run: run.budget * run.epochs * {"ar": 1.5, "diffusion": 1.0, "block": 2.0}[run.side] for run in runs}
    order = sorted(runs, key=lambda r: (r.budget, -cost[r]))  # the smallest budget completes first, longest runs first
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_pin_worker, initargs=(cores, lock)) as pool:
        futures = {run: pool.submit(train_run, run, _for_budget(data, run.budget, args), args, out / run.name)
                   for run in order}
        return [futures[run].result() for run in runs]


def run_repeated_data(args, out: Path) -> dict:
    check_args(args)
    _check_same_experiment(args, out)
    data = prepare_data(args, out)
    for budget in args.budgets:
        budget_blocks(data, budget, args)  # every budget checked before the first run trains
    records = train_grid(grid(args), data, args, out)
    bests = {}
    for record in records:
        key = (record["run"]["budget"], record["run"]["side"])
        if key not in bests or record["best"]["validation"] < bests[key]["best"]["validation"]:
            bests[key] = record
    for record in bests.values():
        record.update(test_estimate(record, out, data, args))
    verdicts = {budget: {} for budget in args.budgets}  # budget -> side -> its paired test difference to AR
    for (budget, side), record in bests.items():
        if side != "ar":
            gap, gap_err = paired_difference(record, bests[(budget, "ar")])
            verdicts[budget][side] = {"minus_ar": gap, "stderr": gap_err, "wins": gap + 2 * gap_err < 0}
    quality = generation_rows(bests, out, data, args)
    summary = {"budgets": args.budgets, "tokenizer_vocab": len(data.tokenizer), "validation_blocks": len(data.validation),
               "test_blocks": len(data.test), "runs": [_without_blocks(r) for r in records],
               "best": {f"{b}:{s}": _without_blocks(r) for (b, s), r in bests.items()},
               "verdicts": {str(b): v for b, v in verdicts.items()}, "quality": quality}
    (out / "results.md").write_text(report(args, data, records, bests, verdicts, quality) + "\n")
    plot_curves(records, bests, args, out / "repeated_data.png")
    return summary


def _without_blocks(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("per_block", "weights")}


def _describe(run: dict) -> str:
    text = f"lr {run['learning_rate']:g}, horizon {run['epochs']} epochs"
    if run["side"] == "block":
        text = f"blocks of {run['block_size']}, " + text
    if run["side"] == "diffusion" and run["dropout"]:
        text += f", dropout {run['dropout']:g}"
    if run["side"] == "block":
        text += f", dropout {run['dropout']:g}, wd {run['weight_decay']:g}"
    if run["side"] == "ar":
        text += f", dropout {run['dropout']:g}, wd {run['weight_decay']:g}"
        text += f", input noise {run['input_noise']:g}" if run["input_noise"] else ""
    return text


def report(args, data: Data, records: list[dict], bests: dict, verdicts: dict, quality: list[dict]) -> str:
    from textdiffusion.models.quality import quality_table

    params = {r["run"]["side"]: r["parameters"] for r in records}
    train_s = sum(r["train_s"] for r in records)
    eval_s = sum(r["eval_s"] for r in records)
    met = {side: [b for b, v in verdicts.items() if v.get(side, {}).get("wins")] for side in SIDES[:2]}
    import platform
    import sys

    command = "textdiffusion " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else "(from Python)"
    lines = [
        "# Repeated data: masked diffusion against the same-size AR model", "",
        f"`{command}` on {platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}.", "",
        f"`{args.dataset}`, one byte-level BPE tokenizer ({len(data.tokenizer):,} tokens) for every budget; blocks of "
        f"{args.max_length} tokens, batch {args.batch_size}; preset `{args.preset}` for every side (diffusion "
        f"{params.get('diffusion', 0) / 1e6:.2f}M parameters, ModernBERT; AR {params.get('ar', 0) / 1e6:.2f}M, GPT-2). "
        "A budget U is the first U tokens of one shuffled packing of the training split, seen again every epoch.",
        f"Every side: AdamW (betas 0.9/0.95, gradient clip 1.0), linear warm-up then a cosine to a tenth of the peak at "
        f"the horizon, stop after {args.patience} evaluations without a new best. Diffusion trains on its ELBO "
        f"(continuous time, a level per example) and is judged by its NELBO bound (exact-k, {args.nelbo_samples} fixed "
        "masks per block on validation, 8 on test); AR by its exact NLL on the same tokens (every token after the "
        "first, special tokens excluded). Each side's best run is chosen on the validation split "
        f"({len(data.validation)} blocks) and reported on the test split ({len(data.test)} blocks, other documents).",
        f"Grid per budget: diffusion lr {args.learning_rates}, horizons {args.epochs} epochs, dropout {args.dropout}, "
        f"weight decay {args.weight_decay}; "
        + (f"block side: blocks of {args.block_side_sizes}, horizons {args.block_epochs or args.epochs} epochs, the "
           f"diffusion side's rates, dropout {args.block_dropout or args.dropout}, weight decay "
           f"{args.block_weight_decay or [args.weight_decay]}, trained and judged by its block NELBO (a level per "
           "block, one mask per row; judged given the clean blocks before by the exact-k block bound, every k of a "
           "block once on validation, twice on test); "
           if args.block_side_sizes else "")
        + f"AR lr {args.ar_learning_rates}, horizons {args.ar_epochs} epochs, dropout "
        f"{args.ar_dropout}, weight decay {args.ar_weight_decay}, input noise {args.ar_input_noise}.",
        f"Compute: {train_s / 3600:.2f} core-hours of training, evaluation {eval_s / max(train_s + eval_s, 1e-9):.1%} "
        "of the total (process CPU time).", "",
        "## Each side's best, on the test split", "",
        "| U (tokens) | side | best run | best epoch | validation | test (nats/token) | epochs run |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for (budget, side), r in sorted(bests.items()):
        lines.append(f"| {budget:,} | {side} | {_describe(r['run'])} | {r['best']['epoch']} | "
                     f"{r['best']['validation']:.4f} | {r['test']:.4f} ± {r['test_stderr']:.4f} | {r['stopped_at_epoch']} |")
    lines += ["", "## Who wins", "", "| U (tokens) | side − AR on test (paired, nats/token) | AR's best epoch | "
              "AR validation at its last evaluation | verdict |", "| --- | --- | --- | --- | --- |"]
    for budget in args.budgets:
        ar = bests[(budget, "ar")]
        last = ar["curve"][-1]
        for side, v in verdicts[budget].items():
            word = (f"{side} lower (beyond 2 s.e.)" if v["wins"] else
                    "AR lower (beyond 2 s.e.)" if v["minus_ar"] - 2 * v["stderr"] > 0 else "within 2 s.e.")
            lines.append(f"| {budget:,} | {side} − AR: {v['minus_ar']:+.4f} ± {v['stderr']:.4f} | {ar['best']['epoch']} | "
                         f"{last['validation']:.4f} at epoch {last['epoch']} | {word} |")
    for side, budgets in met.items():
        if not any(side in v for v in verdicts.values()):
            continue
        what = "diffusion's best NELBO bound" if side == "diffusion" else "the block side's best block NELBO bound"
        lines.append(f"\n**Goal ({what} below AR's best NLL on the same tokens at >= 1 budget): "
                     f"{'met at U = ' + ', '.join(f'{b:,}' for b in budgets) if budgets else 'not met'}.**")
    lines += ["", "A bound is an upper bound on the model's NLL, so a bound below AR's exact NLL means the diffusion "
              "model's likelihood is better; the reverse is not proven by a bound above it.", "",
              "## Every run", "", "| run | best epoch | best validation | stopped at epoch | train (core-s) |",
              "| --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['name']} | {r['best']['epoch']} | {r['best']['validation']:.4f} | {r['stopped_at_epoch']} | "
                     f"{r['train_s']:.0f} |")
    if quality:
        lines += ["", f"## Samples of each side's best model ({args.num_prompts} test prompts of {args.prompt_tokens} "
                  f"tokens, {args.new_tokens} new tokens, seed {args.seed}; diffusion one token per step, AR top-k 50; "
                  f"gen PPL by `{args.scorer}`)", "", quality_table(quality), "", "First sample of each:", ""]
        lines += [f"- **{r['setting']}**: {r['example']}" for r in quality]
    return "\n".join(lines)


def plot_curves(records: list[dict], bests: dict, args, path: Path) -> None:
    """Validation loss against epochs (top) and training FLOPs (bottom), a column per budget; each side's
    best run drawn bold, the rest of its grid faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"diffusion": "tab:blue", "block": "tab:green", "ar": "tab:red"}
    fig, axes = plt.subplots(2, len(args.budgets), figsize=(5 * len(args.budgets), 7.5), squeeze=False)
    for col, budget in enumerate(args.budgets):
        for r in records:
            if r["run"]["budget"] != budget:
                continue
            side = r["run"]["side"]
            best = bests[(budget, side)]["name"] == r["name"]
            style = dict(color=colours[side], lw=2.2 if best else 0.8, alpha=1.0 if best else 0.35,
                         label=f"{side}: {_describe(r['run'])}" if best else None)
            for row, key in ((0, "epoch"), (1, "flops")):
                axes[row][col].plot([p[key] for p in r["curve"]], [p["validation"] for p in r["curve"]], **style)
        shown = [p["validation"] for r in records if r["run"]["budget"] == budget for p in r["curve"]]
        best_starts = [bests[(budget, side)]["curve"][0]["validation"] for side in SIDES if (budget, side) in bests]
        for row, xlabel in ((0, "epochs over the same U tokens"), (1, "training FLOPs (6·N·D)")):
            ax = axes[row][col]
            ax.set_ylim(min(shown) - 0.05, max(best_starts) + 0.15)  # an unstable run's spike would flatten the rest
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation nats/token (diffusion: NELBO bound)")
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"U = {budget:,} unique tokens")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
