"""`textdiffusion generate`: sample text from a checkpoint by iterative denoising.

    textdiffusion generate --checkpoint wiki-small --prefix "The river" --num-samples 4
    textdiffusion generate --checkpoint wiki-small --infill "The <mask:12> was built in <mask:3>."
    textdiffusion generate --checkpoint wiki-small --prefix "In 1905" --confidence-threshold 0.9 --hide-steps
    textdiffusion generate --checkpoint wiki-small --label rivers --guide runs/topics-guide --guidance smc

By default each step is printed with its masks visible (the original tool's behaviour; --hide-steps to
stop it), --animate redraws one live view instead, and --trace-out writes every step as JSON lines.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from textdiffusion.config import SamplerConfig
from textdiffusion.errors import UsageError, require_writable


@dataclass
class GenerateArgs(SamplerConfig):
    """The flags of `textdiffusion generate`: the sampler's settings (inherited from SamplerConfig; where not
    given, the checkpoint's saved generation defaults apply) and what to generate from where."""

    # what `generate --help` shows (cli/help.py); `--help-all` shows every flag
    HELP_GROUPS = {
        "what to generate": ("checkpoint", "prefix", "infill", "max_length", "num_samples", "seed", "output"),
        "denoising": ("steps", "strategy", "confidence_threshold", "block_length", "schedule"),
        "token sampling": ("sampling", "temperature", "top_k", "repetition_penalty"),
        "steering": ("label", "guidance", "guide", "guidance_scale", "cfg_scale"),
        "display and device": ("show_steps", "animate", "stream", "device", "cache"),
    }


    checkpoint: str = field(default="wiki-small", metadata={
        "help": "A checkpoint directory of this project, a bundled model (wiki-small), or any masked LM directory or hub id."})
    prefix: Optional[str] = field(default=None, metadata={"help": "Prompt to continue (the original flag)."})
    infill: Optional[str] = field(default=None, metadata={
        "help": "A template with masked spans, e.g. 'The <mask:12> was built in <mask:3>.'"})
    max_length: int = field(default=0, metadata={"help": "Tokens per sample, prompt included (0: the checkpoint's training length)."})
    num_samples: int = field(default=1, metadata={"help": "Samples to generate (one batch)."})
    cache: str = field(default="auto", metadata={
        "help": "Reuse keys/values within a block (needs --block-length): none, prefix (recompute the block and "
                "what follows), dual (recompute the block only; ModernBERT, the BERT family and an adapted Llama), auto (dual wherever "
                "it applies, else none: the fastest setting at the AR baseline's quality, benchmarks/generation_speed.py)."})
    suppress_tokens: list[str] = field(default_factory=list, metadata={"help": "Tokens never to generate."})
    cfg_scale: float = field(default=0.0, metadata={
        "help": "Classifier-free guidance scale (0: off): guides by the prompt and --label, so it needs one of them."})
    label: Optional[str] = field(default=None, metadata={
        "help": "Write text of this class (a model trained with --label-column): the label is the prompt's first "
                "token; with --cfg-scale s the unconditional pass masks it (and any --prefix) out."})
    guidance: Optional[str] = field(default=None, metadata={
        "help": "How --label steers: cfg (classifier-free, strength --cfg-scale; the default when it is given), "
                "classifier (first-order classifier guidance by --guide; the default when a guide is given) or smc "
                "(--particles rows per sample, resampled each step by the guide)."})
    guide: Optional[str] = field(default=None, metadata={
        "help": "A guide folder from `textdiffusion train-guide` (same tokenizer as --checkpoint): a classifier of "
                "noised text; it also steers a model trained without labels."})
    guidance_scale: float = field(default=2.0, metadata={
        "help": "Strength of --guidance classifier|smc (0: off; the guide's log-probability is multiplied by it)."})
    particles: int = field(default=8, metadata={"help": "--guidance smc: partial generations per sample."})
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
    stream: bool = field(default=False, metadata={
        "help": "Print the first sample's text as it is committed, left to right (a block-diffusion model: block by "
                "block), instead of the steps."})
    step_delay: float = field(default=0.15, metadata={
        "help": "Seconds each step stays on screen with --animate, so a person can follow it (0: as fast as it runs)."})
    trace_out: Optional[str] = field(default=None, metadata={"help": "Write every step's tokens to this JSON-lines file."})
    output: Optional[str] = field(default=None, metadata={"help": "Also write the samples to this JSON-lines file."})

    def __post_init__(self) -> None:
        super().__post_init__()  # the sampler's settings are checked there
        if self.prefix is not None and self.infill is not None:
            raise UsageError("give --prefix or --infill, not both.")
        if self.num_samples < 1:
            raise UsageError(f"--num-samples must be >= 1, got {self.num_samples}.")
        if self.seed < 0:  # as the server's schema: a torch.Generator seed is a non-negative integer
            raise UsageError(f"--seed must be >= 0, got {self.seed}.", field="seed", value=self.seed)
        if self.step_delay < 0:
            raise UsageError(f"--step-delay must be >= 0, got {self.step_delay}.")
        if self.max_length < 0:
            raise UsageError(f"--max-length must be >= 0, got {self.max_length}.")
        from textdiffusion.core.labels import check_guidance

        check_guidance(self.cfg_scale, "--cfg-scale")  # the sign now; whether it can apply once the model is known
        from textdiffusion.pipelines.guidance import check_settings

        if self.guidance is None and self.guide is not None:
            self.guidance = "classifier"  # a guide without a method: the one it exists for
        check_settings(self.guidance, self.cfg_scale, self.guidance_scale, self.particles, self.guide is not None,
                       self.label)
        require_writable("--trace-out", self.trace_out)  # before the model is loaded, not after the work
        require_writable("--output", self.output)
        from textdiffusion.models.kvcache import CACHE_CHOICES

        if self.cache not in CACHE_CHOICES:
            raise UsageError(f"--cache must be one of {CACHE_CHOICES}, got {self.cache!r}.")

    def sampler_kwargs(self) -> dict:
        """The sampler settings the user gave (all of them when built in Python rather than parsed)."""
        names = [f.name for f in fields(SamplerConfig)]
        explicit = getattr(self, "explicit", None)
        return {n: getattr(self, n) for n in names if explicit is None or n in explicit}


def labelled_prompt(args: GenerateArgs, config, text: Optional[str] = None) -> str:
    """``text`` (default: --prefix) behind the label's token when --label is given (labels.py)."""
    text = args.prefix if text is None else text
    if args.label is None:
        return text or ""
    from textdiffusion.core.labels import check_labels, label_token

    check_labels(config.labels, [args.label], "--label", args.checkpoint)
    return label_token(args.label) + (text or "")


def run_causal_generate(args: GenerateArgs, device, dtype) -> list[str]:
    """The AR baseline: KV-cached left-to-right sampling with the same token-sampling flags."""
    from textdiffusion.models.autoregressive import CausalGenerator

    if args.infill is not None:
        raise UsageError(f"--infill needs a masked (diffusion) model; {args.checkpoint!r} is autoregressive.")
    if args.cfg_scale or args.guidance:
        what = f"--cfg-scale {args.cfg_scale:g}" if args.cfg_scale else f"--guidance {args.guidance}"
        raise UsageError(f"{what} needs a masked (diffusion) model; {args.checkpoint!r} is "
                         "autoregressive and has no guidance.")
    generator = CausalGenerator.from_pretrained(args.checkpoint, device, dtype)
    prompt = labelled_prompt(args, generator.config)
    max_length = args.max_length or generator.config.max_length
    room = max_length - len(generator.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 2
    if room < 1:
        raise UsageError(f"--prefix leaves no room to generate within --max-length {max_length}.")
    t0 = time.perf_counter()
    texts = generator.generate([prompt] * args.num_samples, room, sampling=args.sampling, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed)
    if args.label is not None:  # the label's token is the prompt's first token, not text
        from textdiffusion.core.labels import label_token

        texts = [t.removeprefix(label_token(args.label)).lstrip() for t in texts]
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
    """Generate from a checkpoint as its objective says: denoising for a diffusion model, left to right for a
    causal one (``GENERATORS``, below)."""
    from textdiffusion.models.bundled import resolve_checkpoint
    from textdiffusion.models.checkpoints import checkpoint_objective
    from textdiffusion.pipelines.generation import resolve_device, resolve_dtype

    args.checkpoint = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)  # checked before the (slow) model load
    dtype = resolve_dtype(args.dtype, device)
    return GENERATORS[checkpoint_objective(args.checkpoint)](args, device, dtype)


def run_diffusion_generate(args: GenerateArgs, device, dtype) -> list[str]:
    """Iterative denoising, with the steps shown, animated or traced as the flags say."""
    from textdiffusion.pipelines.generation import DiffusionGenerator, write_trace

    generator = DiffusionGenerator.from_pretrained(args.checkpoint, device=str(device), dtype=dtype, compile=args.compile)
    n = args.num_samples
    # the label's token (a labelled model), the guide and their checks: generate() does them once for the library
    templates = [args.infill] * n if args.infill is not None else None
    prompts = None if templates else [args.prefix or ""] * n
    guide = generator.open_guide(args.guide)  # before the run: a foreign tokenizer is refused in one line
    show = not args.hide_steps and not args.animate and not args.stream
    streamed = {"text": None}

    def stream(state):
        """Print what sample 0 has newly committed up to its first mask (a block model: the finished blocks)."""
        row, editable = state.x[0].cpu(), state.editable[0].cpu()
        columns = editable.nonzero().squeeze(1)
        masked = (row[columns] == generator.mask_id).nonzero()
        ready = columns[: int(masked[0]) if len(masked) else len(columns)]
        ids = [i for i in row[ready].tolist() if i != generator.sep_id]
        text = generator.tokenizer.decode(ids, skip_special_tokens=True)
        if streamed["text"] is None:
            print(args.prefix or "", end="", flush=True)
            streamed["text"] = ""
        if text.startswith(streamed["text"]) and len(text) > len(streamed["text"]):
            print(text[len(streamed["text"]):], end="", flush=True)
            streamed["text"] = text

    def on_step(nfe, state):
        if args.stream:
            stream(state)
        if show:
            for i, row in enumerate(state.x.cpu()):
                print(f"  step {state.step_index:>3} (call {nfe:>3}) [{i}] {generator.render(row)}", flush=True)
        if live is not None:  # the rich Live view of --animate, bound by the `with` below
            live.update(_panel(generator, state, nfe))
            if args.step_delay:
                time.sleep(args.step_delay)  # pacing for a person; not counted in the reported time
                paused[0] += args.step_delay

    if args.animate:
        from rich.live import Live

        view = Live(refresh_per_second=12, transient=False)
    else:
        view = nullcontext()
    paused = [0.0]
    t0 = time.perf_counter()
    with view as live:
        out = generator.generate(prompts, templates=templates, max_length=args.max_length or None, seed=args.seed,
                                 cfg_scale=args.cfg_scale, suppress_tokens=args.suppress_tokens,
                                 stop_at_eos=not args.no_eos_stop, return_trace=bool(args.trace_out) or n == 1, cache=args.cache,
                                 on_step=on_step if (show or args.stream or live is not None) else None, label=args.label,
                                 guidance=args.guidance, guide=guide, guidance_scale=args.guidance_scale,
                                 particles=args.particles, **args.sampler_kwargs())
    seconds = time.perf_counter() - t0 - paused[0]
    for note in out.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.stream:
        print(flush=True)
    for i, text in enumerate(out.texts):
        print(f"\n[sample {i}] {text}")
    per_call = ""
    if n == 1 and out.nfe:  # text tokens written (the end-of-text filled in after a stop costs no call)
        written = int(((out.token_ids[0] != generator.sep_id) & (out.trace[0][0] == generator.mask_id)).sum()) \
            if out.trace else 0
        per_call = f" ({written / out.nfe:.2f} tokens per call)" if written else ""
    print(f"\n{n} sample(s), {out.nfe} model calls (NFE){per_call} for {out.steps} planned steps, {seconds:.2f} s",
          flush=True)
    if args.trace_out:
        write_trace(Path(args.trace_out), out.trace, generator.mask_id)
        print(f"trace: {args.trace_out}")
    if args.output:
        with Path(args.output).open("w") as f:
            for i, text in enumerate(out.texts):
                f.write(json.dumps({"sample": i, "seed": args.seed + i, "text": text, "nfe": out.nfe}) + "\n")
    return out.texts


GENERATORS = {"diffusion": run_diffusion_generate, "ar": run_causal_generate}  # by checkpoint_objective


def _panel(generator, state, nfe):
    from rich.panel import Panel
    from rich.text import Text

    body = Text()
    for i, row in enumerate(state.x.cpu()):
        body.append(f"[{i}] ", style="bold")
        body.append(generator.render(row, mask_symbol="█") + "\n")
    masked = int((state.x == generator.mask_id).sum())
    return Panel(body, title=f"step {state.step_index} · model calls {nfe} · masked {masked}")
