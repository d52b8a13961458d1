"""`textdiffusion eval`: the per-mask-level loss and the NELBO bound of a checkpoint on validation data.

An autoregressive checkpoint (`train --objective ar`) gets its exact NLL on the same tokens instead.

    textdiffusion eval --checkpoint wiki-small                       # bundled wiki-vital validation split
    textdiffusion eval --checkpoint wiki-small --dataset austen --output-dir results/eval-austen

Uses the same validation split, packing and fixed-seed masks as the training-time evaluation, so the
numbers are comparable with `per_level_loss.csv`. Writes `eval.json` and `eval.md` when --output-dir is
given (a folder that already holds an evaluation is refused unless --overwrite).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.collator import collator_from_config
from textdiffusion.core.data import load_corpus, pack, unigram_entropy
from textdiffusion.core.denoiser import check_position_limit
from textdiffusion.core.detokenize import text_units
from textdiffusion.core.evaluation import nelbo, per_level_loss, scored_positions
from textdiffusion.core.reporting import format_level_table
from textdiffusion.errors import UsageError, require_writable
from textdiffusion.models.autoregressive import causal_nll, load_causal_lm
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.models.checkpoints import checkpoint_objective
from textdiffusion.models.loading import denoiser_for, load_diffusion_model
from textdiffusion.pipelines.generation import resolve_device


@dataclass
class EvalArgs:
    checkpoint: str = field(default="wiki-small", metadata={"help": "A checkpoint directory, a bundled model (wiki-small) or a hub id."})
    dataset: str = field(default="wiki-vital", metadata={"help": "Same sources as `train --dataset`."})
    text_column: str = field(default="text", metadata={"help": "Column/field that holds the text."})
    validation_fraction: float = field(default=0.05, metadata={"help": "As in training (the split must match)."})
    max_length: int = field(default=0, metadata={"help": "Block length (0: the checkpoint's training length, else 128)."})
    eval_blocks: int = field(default=256, metadata={"help": "Validation blocks to evaluate."})
    samples_per_block: int = field(default=4, metadata={"help": "NELBO samples per block (more: smaller error bar)."})
    estimator: str = field(default="exact-k", metadata={"help": "NELBO estimator: exact-k, continuous, or both."})
    batch_size: int = field(default=32, metadata={"help": "Blocks per forward pass."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Write eval.json and eval.md here."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an evaluation already in --output-dir."})

    def __post_init__(self) -> None:
        for name in ("eval_blocks", "samples_per_block", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.estimator not in ("exact-k", "continuous", "both"):
            raise UsageError(f"--estimator must be exact-k, continuous or both, got {self.estimator!r}.")
        require_writable("--output-dir", self.output_dir, directory=True)
        if self.output_dir and (Path(self.output_dir) / "eval.json").exists() and not self.overwrite:
            raise UsageError(f"--output-dir {self.output_dir!r} already holds an evaluation; pass --overwrite or choose another.")


def _load(args: EvalArgs, loader):
    """(tokenizer, model on its device, the checkpoint's training settings, block length, validation blocks):
    the same split and packing as training, whichever objective the checkpoint has."""
    device = resolve_device(args.device)  # checked before the (slow) corpus and model loads
    config = DiffusionConfig.from_pretrained(args.checkpoint)  # a model from elsewhere: the foreign-model defaults
    tokenizer, model = loader(args.checkpoint, config)  # checks the weights file first
    max_length = args.max_length or config.max_length
    check_position_limit(model, max_length)
    model.to(device).eval()
    corpus = load_corpus(args.dataset, args.text_column, args.validation_fraction)
    blocks = pack(corpus.validation, tokenizer, max_length, keep_remainder=True)[: args.eval_blocks]
    if getattr(model, "missing_head_keys", None):  # a pretrained encoder without its MLM head (mpnet-base)
        from textdiffusion.models.heads import build_head

        fit = build_head(model, pack(corpus.train, tokenizer, max_length), tokenizer)
        print(f"note: {args.checkpoint} has no MLM head; evaluating the head built from the training split's "
              f"statistics (heads.py; logit scale {fit['logit_scale']:.2f}), as `train` starts from", flush=True)
    return tokenizer, model, config, max_length, blocks


def run_causal_eval(args: EvalArgs) -> dict:
    """Exact NLL of an autoregressive checkpoint on the tokens a diffusion evaluation would score."""
    tokenizer, model, config, max_length, blocks = _load(args, lambda path, config: load_causal_lm(path))
    prefix = config.prefix_length
    scored = scored_positions(blocks, tokenizer, prefix)
    nll = causal_nll(model, blocks, scored, batch_size=args.batch_size)
    units = per_unit(nll.nats_per_token, nll.tokens, *text_units(tokenizer, blocks, scored))
    report = (f"exact NLL of the autoregressive model ({len(blocks)} blocks of {max_length} tokens; the first "
              f"{prefix} tokens of each block and special tokens are given, not scored):\n"
              f"  {nll.nats_per_token:.4f} ± {nll.stderr:.4f} nats/token, {nll.bits_per_token:.4f} bits/token, "
              f"perplexity {nll.perplexity_bound:.2f}  ({nll.tokens:,} tokens)\n"
              f"  {format_units(units)}")
    print(report)
    result = {"checkpoint": args.checkpoint, "dataset": args.dataset, "blocks": len(blocks), "max_length": max_length,
              "objective": "ar", "nll": {**asdict(nll), "bits_per_token": nll.bits_per_token,
                                         "perplexity": nll.perplexity_bound, **units}, "args": asdict(args)}
    _write(args, report, result)
    return result


def per_unit(nats_per_token: float, tokens: int, words: int, nbytes: int) -> dict[str, float]:
    """The bound summed over the scored tokens, per word and per UTF-8 byte of their text: numbers that
    compare across tokenizers (a WordPiece token and a BPE token are not the same amount of text)."""
    import math

    total = nats_per_token * tokens
    return {"words": words, "bytes": nbytes, "nats_per_word": total / max(words, 1),
            "bits_per_byte": total / max(nbytes, 1) / math.log(2)}


def format_units(units: dict[str, float]) -> str:
    return (f"tokenizer-independent: {units['nats_per_word']:.4f} nats/word, {units['bits_per_byte']:.4f} bits/byte  "
            f"({units['words']:,} words, {units['bytes']:,} bytes of detokenised text)")


def _write(args: EvalArgs, report: str, result: dict) -> None:
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.md").write_text("```\n" + report + "\n```\n")
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")  # written last: its presence means complete
        print(f"results: {out}/eval.json, {out}/eval.md")


def run_eval(args: EvalArgs) -> dict:
    """Evaluate a checkpoint as its objective says: the NELBO bound of a diffusion model, the exact NLL of a
    causal one (``EVALUATORS``, below)."""
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    return EVALUATORS[checkpoint_objective(args.checkpoint)](args)


def run_diffusion_eval(args: EvalArgs) -> dict:
    """Per-level loss and the NELBO of a masked diffusion checkpoint."""
    import torch


    tokenizer, model, config, max_length, blocks = _load(args, partial(load_diffusion_model, flag="--checkpoint"))
    model = denoiser_for(model, config)  # a causal LM adapted to diffusion: shifted logits, full attention
    if config.block_size:
        return run_block_eval(args, tokenizer, model, config, max_length, blocks)
    collator = collator_from_config(tokenizer, config.corruption, training=False)
    levels = per_level_loss(model, blocks, collator, batch_size=args.batch_size)
    unigram = unigram_entropy(blocks, list(tokenizer.all_special_ids))
    estimators = ["exact-k", "continuous"] if args.estimator == "both" else [args.estimator]
    bounds = [nelbo(model, blocks, collator, estimator=e, samples_per_block=args.samples_per_block,
                    batch_size=args.batch_size) for e in estimators]

    table = format_level_table(levels, {"unigram entropy of these tokens": unigram},
                               f"validation loss at each mask level ({len(blocks)} blocks of {max_length} tokens):")
    lines = [table, "", "NELBO (upper bound on NLL), per scored token "
             f"(the first {collator.prefix_length} tokens of each block are given, not scored):"]
    words, nbytes = text_units(tokenizer, blocks, collator.maskable(blocks, torch.full((len(blocks),),
                                                                                      collator.prefix_length)))
    units = [per_unit(b.nats_per_token, b.tokens, words, nbytes) for b in bounds]
    for b, u in zip(bounds, units):
        lines.append(f"  {b.estimator:>10}: {b.nats_per_token:.4f} ± {b.stderr:.4f} nats/token, {b.bits_per_token:.4f} "
                     f"bits/token, perplexity <= {b.perplexity_bound:.2f}  ({b.tokens:,} tokens)")
        lines.append(f"  {'':>10}  {format_units(u)}")
    report = "\n".join(lines)
    print(report)
    result = {"checkpoint": args.checkpoint, "dataset": args.dataset, "blocks": len(blocks), "max_length": max_length,
              "objective": "diffusion", "per_level": [asdict(r) for r in levels], "unigram_entropy": unigram,
              "nelbo": [{**asdict(b), "bits_per_token": b.bits_per_token, "perplexity_bound": b.perplexity_bound, **u}
                        for b, u in zip(bounds, units)], "args": asdict(args)}
    _write(args, report, result)
    return result


def run_block_eval(args: EvalArgs, tokenizer, model, config, max_length: int, blocks) -> dict:
    """Per-level loss (every block at one level) and the block NELBO of a block-diffusion checkpoint: each block's
    bound given the clean blocks before it (models/block.py), on every token after the first block."""
    from textdiffusion.config import DEFAULT_MASK_PROBS
    from textdiffusion.models.block import block_level_loss, block_nelbo, scoring_corruption

    B = config.block_size
    corruption = scoring_corruption(tokenizer, B, config.adapted_from_causal, config.prefix_length)
    levels = block_level_loss(model, blocks, corruption, DEFAULT_MASK_PROBS, batch_size=args.batch_size)
    bound = block_nelbo(model, blocks, corruption, samples_per_block=args.samples_per_block, batch_size=args.batch_size)
    words, nbytes = text_units(tokenizer, blocks, corruption.maskable(blocks))
    units = per_unit(bound.nats_per_token, bound.tokens, words, nbytes)
    unigram = unigram_entropy(blocks, list(tokenizer.all_special_ids))
    table = format_level_table(levels, {"unigram entropy of these tokens": unigram},
                               f"validation loss with every block at each mask level ({len(blocks)} blocks of "
                               f"{max_length} tokens, blocks of {B}):")
    report = "\n".join([table, "", f"block NELBO (an upper bound on NLL; blocks of {B}, each given the clean blocks "
                        f"before it; the first {corruption.prefix} tokens are given, not scored):",
                        f"  {bound.nats_per_token:.4f} ± {bound.stderr:.4f} nats/token, {bound.bits_per_token:.4f} "
                        f"bits/token, perplexity <= {bound.perplexity_bound:.2f}  ({bound.tokens:,} tokens)",
                        f"  {format_units(units)}"])
    print(report)
    result = {"checkpoint": args.checkpoint, "dataset": args.dataset, "blocks": len(blocks), "max_length": max_length,
              "objective": "diffusion", "block_size": B, "per_level": [asdict(r) for r in levels],
              "unigram_entropy": unigram,
              "nelbo": [{**asdict(bound), "bits_per_token": bound.bits_per_token,
                         "perplexity_bound": bound.perplexity_bound, **units}], "args": asdict(args)}
    _write(args, report, result)
    return result


EVALUATORS = {"diffusion": run_diffusion_eval, "ar": run_causal_eval}  # by models.autoregressive.checkpoint_objective
