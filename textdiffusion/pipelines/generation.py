"""Generating text with a trained masked LM: templates in, texts out, the sampler in between.

    gen = DiffusionGenerator.from_pretrained("wiki-small")
    gen.generate(["The river"], steps=16).texts
    gen.generate(templates=["The <mask:12> was built in <mask:3>."]).texts

A template is text with masked spans ``<mask:N>`` (N positions) or ``<mask>`` (one); a prompt is the
special case of a template whose only span is the rest of the block. The loop is: one forward pass for
the whole batch, the sampler's step, repeat until no mask is left. A step that would commit nothing
skips the forward pass; the number of forward passes is reported as NFE.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from textdiffusion.config import DiffusionConfig, SamplerConfig
from textdiffusion.core.denoiser import check_position_limit
from textdiffusion.core.detokenize import decode_text
from textdiffusion.core.labels import label_token
from textdiffusion.core.sampler import DenoisingState, continuation
from textdiffusion.core.templates import MASK_SPAN
from textdiffusion.errors import UsageError
from textdiffusion.models.loading import denoiser_for, open_checkpoint
from textdiffusion.pipelines.denoising import DenoisingRun, GenerationOutput

if TYPE_CHECKING:
    from textdiffusion.models.guide import NoisyClassifier


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, float32 elsewhere (bfloat16 on a CPU with AMX is
    several times faster but changes the numbers slightly, so it is opt-in there)."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in available_devices():
        raise UsageError(f"--device {device!r} is not available here (available: {', '.join(available_devices())}).")
    return torch.device(device)


class DiffusionGenerator:
    """A masked LM plus its tokenizer and the diffusion settings it was trained with."""

    def __init__(self, model, tokenizer, config: DiffusionConfig | dict | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, compile: bool = False):
        if tokenizer.mask_token_id is None:
            raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no mask token: "
                             "it cannot denoise. Use a masked-LM checkpoint.")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        # how the checkpoint was trained and its generation defaults; a model from elsewhere gets the
        # foreign-model defaults (nothing learned about end-of-text or a prompt prefix)
        if isinstance(config, dict):  # a settings dict as saved by version 1
            config = DiffusionConfig.from_dict(config)
        self.config = config or DiffusionConfig.for_foreign_model()
        # logits at the masked positions only; a causal LM adapted to diffusion gets its shifted wrapper
        self.denoiser = denoiser_for(self.model, self.config).eval()
        self.cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.sep_id
        self.mask_id = tokenizer.mask_token_id
        self.name = getattr(tokenizer, "name_or_path", None) or "?"  # the checkpoint, for messages
        # compile=True: one static-shape graph per batch shape (full logits, indexed afterwards); on a GPU with
        # CUDA graphs ("reduce-overhead"), which removes the kernel-launch overhead that dominates batch 1
        self._compiled = None
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._compiled = torch.compile(self._full_logits, mode=mode, dynamic=False)

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, dtype: torch.dtype | None = None,
                        compile: bool = False) -> "DiffusionGenerator":
        """Load a checkpoint of this project, or any masked LM directory / hub id (default settings then)."""
        opened = open_checkpoint(path, dtype=dtype)  # an encoder without its head is refused: its text would be noise
        generator = cls(opened.model, opened.tokenizer, opened.config, device, dtype, compile)
        generator.name = path
        return generator

    # -- templates --------------------------------------------------------------------------------
    def encode_template(self, template: str) -> tuple[list[int], list[bool]]:
        """Token ids and an editable flag per position for a template with ``<mask:N>`` spans."""
        ids, editable, pos = [], [], 0
        for match in MASK_SPAN.finditer(template):
            text = template[pos:match.start()].rstrip(" ")  # the span's tokens carry their own leading space
            if text:
                piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                editable += [False] * len(piece)
            n = int(match.group(1) or 1)
            if n < 1:
                raise UsageError(f"--infill: a span must have at least one position, got {match.group(0)!r}.", field="template", value=template)
            ids += [self.mask_id] * n
            editable += [True] * n
            pos = match.end()
        if not any(editable):
            raise UsageError(f"--infill {template!r} has no masked span: write <mask:N> where text should be generated.", field="template", value=template)
        tail = template[pos:]
        if tail:
            piece = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
            ids += piece
            editable += [False] * len(piece)
        return ids, editable

    def prompt_template(self, prompt: str, max_length: int) -> str:
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
        room = max_length - n_prompt - (self.cls_id is not None) - (self.sep_id is not None)
        if room < 1:
            raise UsageError(f"--prefix is {n_prompt} tokens long: it leaves no room to generate within "
                             f"--max-length {max_length}; raise --max-length or shorten the prompt.", field="prompt", value=prompt)
        return f"{prompt}<mask:{room}>"

    def build_batch(self, templates: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids [b, l], editable [b, l], attention mask [b, l]); rows padded on the right."""
        rows = []
        for template in templates:
            ids, editable = self.encode_template(template)
            if self.cls_id is not None:
                ids, editable = [self.cls_id] + ids, [False] + editable
            if self.sep_id is not None:
                ids, editable = ids + [self.sep_id], editable + [False]
            if max_length is not None and len(ids) > max_length:
                raise UsageError(f"the template is {len(ids)} tokens long, more than --max-length {max_length}.", field="template", value=template)
            rows.append((ids, editable))
        length = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        editable = torch.zeros((len(rows), length), dtype=torch.bool)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, ed) in enumerate(rows):  # one row at a time, once, before the loop
            x[i, : len(ids)] = torch.tensor(ids)
            editable[i, : len(ed)] = torch.tensor(ed)
            attention[i, : len(ids)] = 1
        return x, editable, attention

    # -- the loop ---------------------------------------------------------------------------------
    def _full_logits(self, x: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        return self.denoiser(input_ids=x, attention_mask=attention).logits  # [b, l, V]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str] | str | None = None, *, templates: Sequence[str] | None = None,
                 max_length: int | None = None, seed: int = 0, cfg_scale: float = 0.0,
                 suppress_tokens: Sequence[str] = (), allowed: torch.Tensor | None = None,
                 stop_at_eos: bool = True, return_trace: bool = False, cache: str = "auto", cache_refresh: str = "block",
                 on_step: Callable[[int, DenoisingState], None] | None = None, label: str | None = None,
                 guidance: str | None = None, guide: "NoisyClassifier | str | None" = None, guidance_scale: float = 1.0,
                 particles: int = 4, **sampler_kwargs) -> GenerationOutput:
        """Generate one text per prompt (continuation) or per template (infilling).

        ``seed + i`` seeds sample i, so a sample is the same whatever batch it is in. ``sampler_kwargs``
        are the fields of :class:`SamplerConfig` (steps, strategy, sampling, temperature, ...).
        ``allowed``: a bool tensor [l, V] or [b, l, V] of the tokens allowed at each position.
        ``cache``: ``prefix`` or ``dual`` reuse keys/values within a block (needs ``block_length``; see
        :mod:`textdiffusion.models.kvcache`); ``cache_refresh="step"`` recomputes them at every step (exact).

        ``label``: write text of this class. On a model trained with labels its token opens every row; with
        ``guidance`` ``"classifier"`` or ``"smc"`` a ``guide`` (a :class:`NoisyClassifier` or its folder, from
        ``train-guide``) steers toward it with strength ``guidance_scale``, on a labelled or an unlabelled model
        (``smc``: ``particles`` rows per sample); ``"cfg"`` is classifier-free guidance by ``cfg_scale``, the
        default whenever ``cfg_scale`` > 0 (see :mod:`textdiffusion.pipelines.guidance`).
        """
        from textdiffusion.core.labels import check_guidance
        from textdiffusion.pipelines.guidance import check_method, label_prefix, make_guider

        if isinstance(prompts, str):
            prompts = [prompts]
        if (prompts is None) == (templates is None):
            raise UsageError("give either prompts or templates.")
        guide = self.open_guide(guide)
        if guidance is None and guide is not None:
            guidance = "classifier"  # a guide given without its method: the one it exists for
        check_method(guidance, cfg_scale, guide, label, guidance_scale, particles)
        if guidance == "cfg":
            guide = None  # classifier-free guidance needs no guide
        head = label_prefix(self.config.labels, label, guide, self.name)
        if head:
            suppress_tokens = list(suppress_tokens) + [label_token(c) for c in self.config.labels]
        max_length = max_length or self.config.max_length
        check_position_limit(self.model, max_length)
        if templates is None:
            templates = [self.prompt_template(head + p, max_length) for p in prompts]
        else:
            templates = [head + t for t in templates]
        if not templates:
            raise UsageError("nothing to generate: the list of prompts/templates is empty.")
        check_guidance(cfg_scale, "--cfg-scale", templates, self.config.labels)
        guider = make_guider(guidance, guide, label, guidance_scale, particles, seed)
        unknown = set(sampler_kwargs) - {f.name for f in fields(SamplerConfig)}
        if unknown:
            raise TypeError(f"unknown generation setting(s): {sorted(unknown)}")
        config = dataclasses.replace(self.config.generation, **sampler_kwargs)  # the checkpoint's defaults, overridden
        run = DenoisingRun(self, cache, cache_refresh)  # the same loop the server's engine drives
        group = run.add(templates, config, seed=seed, cfg_scale=cfg_scale, suppress_tokens=suppress_tokens,
                        stop_at_eos=stop_at_eos, max_length=max_length, allowed=allowed, return_trace=return_trace,
                        on_step=on_step, guider=guider)
        run.run_to_end()
        return run.result(group)

    def open_guide(self, guide: "NoisyClassifier | str | None") -> "NoisyClassifier | None":
        """The guide (loaded from its folder if given as one) on this generator's device, checked to share its
        tokenizer: a guide's gradients are per token id."""
        if guide is None:
            return None
        if isinstance(guide, (str, Path)):
            from textdiffusion.models.guide import NoisyClassifier

            guide = NoisyClassifier.load(guide, self.device)
        guide.check_tokenizer(self.tokenizer, self.name)
        return guide

    def suppress_ids(self, tokens: Sequence[str]) -> list[int]:
        """Ids never generated: the given tokens (as strings or ids), plus pad and the block-opening token."""
        ids = {i for i in (self.pad_id, self.cls_id) if i is not None}
        vocab = self.tokenizer.get_vocab()
        for t in tokens:
            if isinstance(t, int) or str(t).isdigit():
                ids.add(int(t))
            elif t in vocab:
                ids.add(vocab[t])
            else:
                pieces = self.tokenizer(t, add_special_tokens=False)["input_ids"]
                if len(pieces) != 1:
                    raise UsageError(f"--suppress-tokens {t!r} is not one token of this tokenizer (it is {len(pieces)}).", field="suppress_tokens", value=t)
                ids.add(pieces[0])
        return sorted(ids)

    # -- text out ---------------------------------------------------------------------------------
    def decode(self, row: torch.Tensor, editable: torch.Tensor, stop_at_eos: bool = True) -> str:
        """Text of one row; with ``stop_at_eos``, the last span ends at the first end-of-text token in it."""
        keep = torch.ones_like(editable)
        if stop_at_eos and self.sep_id is not None:
            eos = (row == self.sep_id) & continuation(editable[None])[0]  # [l]
            if bool(eos.any()):
                keep = torch.arange(len(row)) < int(eos.nonzero()[0])
        return decode_text(self.tokenizer, row[keep].tolist()).strip()  # WordPiece joined as text

    def render(self, row: torch.Tensor, mask_symbol: str = "_") -> str:
        """One row with masks visible (one symbol per masked position), for showing the process."""
        pieces, run = [], []
        for tok in row.tolist() + [None]:  # display only: group unmasked runs and decode each once
            if tok is not None and tok != self.mask_id:
                run.append(tok)
                continue
            if run:
                pieces.append(decode_text(self.tokenizer, run))
                run = []
            if tok == self.mask_id:
                pieces.append(" " + mask_symbol)
        return "".join(pieces).strip()


def write_trace(path: Path, trace: list[torch.Tensor], mask_id: int) -> None:
    """One JSON line per step: the token ids of every sample and how many are still masked."""
    with path.open("w") as f:
        for i, x in enumerate(trace):
            f.write(json.dumps({"step": i, "masked": (x == mask_id).sum(1).tolist(), "tokens": x.tolist()}) + "\n")
