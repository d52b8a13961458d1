"""`textdiffusion generate`: sample text from a checkpoint by iterative denoising.

    textdiffusion generate --checkpoint wiki-small --prefix "The river" --num-samples 4
    textdiffusion generate --checkpoint wiki-small --infill "The <mask:12> was built in <mask:3>."
    textdiffusion generate --checkpoint wiki-small --prefix "In 1905" --confidence-threshold 0.9 --hide-steps

By default each step is printed with its masks visible (the original tool's behaviour; --hide-steps to
stop it), --animate redraws one live view instead, and --trace-out writes every step as JSON lines.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UsageError
from .sampler import SAMPLINGS, STRATEGIES, SamplerConfig
from .schedules import SCHEDULES


@dataclass
class GenerateArgs:
    checkpoint: str = field(default="wiki-small", metadata={
        "help": "A checkpoint directory of this project, a bundled model (wiki-small), or any masked LM directory or hub id."})
    prefix: Optional[str] = field(default=None, metadata={"help": "Prompt to continue (the original flag)."})
    infill: Optional[str] = field(default=None, metadata={
        "help": "A template with masked spans, e.g. 'The <mask:12> was built in <mask:3>.'"})
    max_length: int = field(default=0, metadata={"help": "Tokens per sample, prompt included (0: the checkpoint's training length)."})
    num_samples: int = field(default=1, metadata={"help": "Samples to generate (one batch)."})
    steps: int = field(default=16, metadata={"help": "Denoising steps (clamped to the number of masked tokens)."})
    schedule: str = field(default="linear", metadata={"help": f"Masked fraction over the steps: {sorted(SCHEDULES)}."})
    strategy: str = field(default="confidence", metadata={"help": f"Which positions to unmask: {STRATEGIES}."})
    sampling: str = field(default="topk", metadata={"help": f"Token sampling: {SAMPLINGS}."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature (> 0)."})
    top_k: int = field(default=50, metadata={"help": "Top-k for --sampling topk."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus mass for --sampling nucleus, in (0, 1]."})
    confidence_threshold: Optional[float] = field(default=None, metadata={
        "help": "Commit every masked token with probability >= this (at least one per step); steps become adaptive."})
    remask_fraction: float = field(default=0.0, metadata={
        "help": "ReMDM-style self-correction: re-mask this fraction (times the mask ratio) of committed tokens per step."})
    block_length: Optional[int] = field(default=None, metadata={"help": "Semi-autoregressive blocks of this many tokens."})
    order_temperature: float = field(default=2.0, metadata={
        "help": "Gumbel noise on the unmasking order (0: strictly most-confident first; see benchmarks/degeneration.py)."})
    repetition_penalty: float = field(default=1.3, metadata={"help": "Penalise tokens already in the sample (1: off)."})
    eb_gamma: float = field(default=16.0, metadata={
        "help": "--strategy eb: entropy budget (nats, > 0) of the tokens committed in one step; larger = fewer calls."})
    cache: str = field(default="none", metadata={
        "help": "Reuse keys/values within a block (needs --block-length): none, prefix (recompute the block and "
                "what follows), dual (recompute the block only). ModernBERT and the BERT family."})
    suppress_tokens: list[str] = field(default_factory=list, metadata={"help": "Tokens never to generate."})
    cfg_scale: float = field(default=0.0, metadata={"help": "Classifier-free guidance scale (0: off)."})
    no_eos_stop: bool = field(default=False, metadata={"help": "Keep text after the first end-of-text token."})
    seed: int = field(default=0, metadata={"help": "Sample i uses seed + i."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto."})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16 (fast on CPUs with AMX), float16."})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the denoising forward (static shapes; CUDA graphs on a GPU). Pays off over many samples."})
    hide_steps: bool = field(default=False, metadata={"help": "Do not print the intermediate steps."})
    show_steps: bool = field(default=False, metadata={"help": "Print every step with masks visible (the default unless --hide-steps)."})
    animate: bool = field(default=False, metadata={"help": "Redraw one live view in the terminal instead of printing steps."})
    trace_out: Optional[str] = field(default=None, metadata={"help": "Write every step's tokens to this JSON-lines file."})
    output: Optional[str] = field(default=None, metadata={"help": "Also write the samples to this JSON-lines file."})

    def __post_init__(self) -> None:
        if self.prefix is not None and self.infill is not None:
            raise UsageError("give --prefix or --infill, not both.")
        if self.num_samples < 1:
            raise UsageError(f"--num-samples must be >= 1, got {self.num_samples}.")
        if self.max_length < 0:
            raise UsageError(f"--max-length must be >= 0, got {self.max_length}.")
        from .kvcache import CACHE_MODES

        if self.cache not in CACHE_MODES:
            raise UsageError(f"--cache must be one of {CACHE_MODES}, got {self.cache!r}.")
        if self.cache != "none" and self.block_length is None:
            raise UsageError(f"--cache {self.cache} reuses keys/values within a block: it needs --block-length "
                             "(e.g. --block-length 32), got none.")
        try:
            SamplerConfig(**self.sampler_kwargs())
        except ValueError as e:
            raise UsageError(_flag_message(str(e))) from None

    def sampler_kwargs(self) -> dict:
        return dict(steps=self.steps, schedule=self.schedule, strategy=self.strategy, sampling=self.sampling,
                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    confidence_threshold=self.confidence_threshold, remask_fraction=self.remask_fraction,
                    block_length=self.block_length, order_temperature=self.order_temperature,
                    repetition_penalty=self.repetition_penalty, eb_gamma=self.eb_gamma)


def run_causal_generate(args: GenerateArgs, device, dtype) -> list[str]:
    """The AR baseline: KV-cached left-to-right sampling with the same token-sampling flags."""
    from .autoregressive import CausalGenerator

    if args.infill is not None:
        raise UsageError(f"--infill needs a masked (diffusion) model; {args.checkpoint!r} is autoregressive.")
    generator = CausalGenerator.from_pretrained(args.checkpoint, device, dtype)
    prompt = args.prefix or ""
    max_length = args.max_length or int(generator.settings.get("max_length", 0)) or 128
    room = max_length - len(generator.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 2
    if room < 1:
        raise UsageError(f"--prefix leaves no room to generate within --max-length {max_length}.")
    t0 = time.perf_counter()
    texts = generator.generate([prompt] * args.num_samples, room, sampling=args.sampling, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed)
    seconds = time.perf_counter() - t0
    for i, text in enumerate(texts):
        print(f"\n[sample {i}] {text}")
    print(f"\n{args.num_samples} sample(s), autoregressive with KV cache (one model call per token), {seconds:.2f} s",
          flush=True)
    if args.output:
        with Path(args.output).open("w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"sample": i, "seed": args.seed, "text": text}) + "\n")
    return texts


def run_generate(args: GenerateArgs) -> list[str]:
    from .autoregressive import is_causal_checkpoint
    from .generation import DiffusionGenerator, resolve_device, resolve_dtype, write_trace

    from .bundled import resolve_checkpoint

    args.checkpoint = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)  # checked before the (slow) model load
    dtype = resolve_dtype(args.dtype, device)
    if is_causal_checkpoint(args.checkpoint):
        return run_causal_generate(args, device, dtype)
    generator = DiffusionGenerator.from_pretrained(args.checkpoint, device=str(device), dtype=dtype, compile=args.compile)
    n = args.num_samples
    templates = [args.infill] * n if args.infill is not None else None
    prompts = None if templates else [args.prefix or ""] * n
    show = not args.hide_steps and not args.animate

    def on_step(nfe, state):
        if show:
            for i, row in enumerate(state.x.cpu()):
                print(f"  step {state.step_index:>3} (call {nfe:>3}) [{i}] {generator.render(row)}", flush=True)
        if live is not None:  # the rich Live view of --animate, bound by the `with` below
            live.update(_panel(generator, state, nfe))

    if args.animate:
        from rich.live import Live

        view = Live(refresh_per_second=12, transient=False)
    else:
        view = nullcontext()
    t0 = time.perf_counter()
    with view as live:
        out = generator.generate(prompts, templates=templates, max_length=args.max_length or None, seed=args.seed,
                                 cfg_scale=args.cfg_scale, suppress_tokens=args.suppress_tokens,
                                 stop_at_eos=not args.no_eos_stop, return_trace=bool(args.trace_out), cache=args.cache,
                                 on_step=on_step if (show or live is not None) else None, **args.sampler_kwargs())
    seconds = time.perf_counter() - t0
    for note in out.notes:
        print(f"note: {note}", file=sys.stderr)
    for i, text in enumerate(out.texts):
        print(f"\n[sample {i}] {text}")
    print(f"\n{n} sample(s), {out.nfe} model calls (NFE) for {out.steps} planned steps, {seconds:.2f} s", flush=True)
    if args.trace_out:
        write_trace(Path(args.trace_out), out.trace, generator.mask_id)
        print(f"trace: {args.trace_out}")
    if args.output:
        with Path(args.output).open("w") as f:
            for i, text in enumerate(out.texts):
                f.write(json.dumps({"sample": i, "seed": args.seed + i, "text": text, "nfe": out.nfe}) + "\n")
    return out.texts


def _panel(generator, state, nfe):
    from rich.panel import Panel
    from rich.text import Text

    body = Text()
    for i, row in enumerate(state.x.cpu()):
        body.append(f"[{i}] ", style="bold")
        body.append(generator.render(row, mask_symbol="█") + "\n")
    masked = int((state.x == generator.mask_id).sum())
    return Panel(body, title=f"step {state.step_index} · model calls {nfe} · masked {masked}")


def _flag_message(message: str) -> str:
    """Turn the sampler's "`top_p` must ..." into the command line's "--top-p must ..."."""
    import re

    return re.sub(r"`([a-z_]+)`", lambda m: "--" + m.group(1).replace("_", "-"), message)
