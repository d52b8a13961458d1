"""One denoising run: the loop that `DiffusionGenerator.generate` and the server's engine both drive.

    run = DenoisingRun(generator, cache="auto")
    group = run.add(["The river<mask:40>"], config)     # a request: its rows, its sampler, its seeds
    while not group.done:
        run.step()                                       # ONE model call for every group that needs one
    run.result(group).texts

A *group* is one request: its templates (one row each), its own :class:`SamplerConfig`, one
``torch.Generator`` per row, its classifier-free guidance. Groups join (``add``) and leave (``remove``)
between steps; ``step()`` skips, for every group, the steps that commit nothing, then stacks the rows of
the groups that need a model call into one right-padded batch, computes the logits at the union of
their needed positions, hands each group its own contiguous slice and lets its sampler step. Because a
row's logits do not depend on the other rows and every row draws from its own generator, a group's
text is the one it gets alone (``tests/test_serve.py`` checks this through the server).

**The key/value cache across requests.** Groups that generate in blocks (``block_length``) on an
architecture the cache supports keep their rows in one :class:`DenoisingKVCache` (Fast-dLLM's dual
cache), whose rows are the cached groups' rows in the order they joined. A group that joins appends
rows (their first call is a full forward that fills them); a group that leaves takes its rows out with
one ``index_select`` per layer; the other rows keep their keys and values, so an arrival or a departure
never recomputes anyone else's cache. Groups that cannot use the cache (no blocks, ``cache="none"``)
run through the plain masked-positions forward in the same tick. A guided group (``cfg_scale``) brings
twice its rows — the samples and the same samples with the prompt masked out — to either path. A group
with a guider (``pipelines/guidance.py``: classifier guidance, particles) steers its logits before its
sampler's step and, with particles, resamples its rows after it; the run then moves the group's cached
keys/values with its rows (``_reorder_cache``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from textdiffusion.config import SamplerConfig
from textdiffusion.core.denoiser import masked_logits
from textdiffusion.core.sampler import DenoisingSampler, DenoisingState, continuation
from textdiffusion.errors import UsageError
from textdiffusion.models.block import BlockKVCache
from textdiffusion.models.kvcache import CACHE_CHOICES, REFRESH, DenoisingKVCache, cache_support
from textdiffusion.pipelines.guidance import Guider

PARTICLE_SEED_STRIDE = 1_000_003  # particle j of a sample draws from the sample's seed + j * this


@dataclass
class GenerationOutput:
    texts: list[str]
    nfe: int  # forward passes of the model (model calls), the cost of generation
    steps: int  # steps of the plan (a step may be skipped without a model call)
    token_ids: torch.Tensor  # [b, l] final tokens
    trace: list[torch.Tensor] = field(default_factory=list)  # [b, l] tokens at the start and after each step
    notes: list[str] = field(default_factory=list)
    config: SamplerConfig | None = None  # the settings used: the checkpoint's defaults with the call's overrides


class DenoisingGroup:
    """One request in a run: its rows, sampler and state, and what the last step did (for streaming)."""

    _ids = itertools.count(1)

    def __init__(self, g, templates: Sequence[str], config: SamplerConfig, *, seed: int = 0, cfg_scale: float = 0.0,
                 suppress_tokens: Sequence[str] = (), stop_at_eos: bool = True, max_length: int | None = None,
                 allowed: torch.Tensor | None = None, return_trace: bool = False,
                 on_step: Callable[[int, DenoisingState], None] | None = None, guider: Guider | None = None):
        if seed < 0:  # one rule for the library, the command line and the server: torch seeds are >= 0
            raise UsageError(f"seed must be >= 0, got {seed}.", field="seed", value=seed)
        self.id = next(self._ids)
        self.config, self.cfg_scale, self.stop_at_eos, self.on_step = config, cfg_scale, stop_at_eos, on_step
        self.guider = guider  # classifier guidance or particles (pipelines/guidance.py); cfg is cfg_scale
        particles = guider.particles if guider is not None else 1
        templates = [t for t in templates for _ in range(particles)]  # sample i owns rows i*P .. i*P + P-1
        x, editable, attention = (t.to(g.device) for t in g.build_batch(templates, max_length))  # [b, l] each
        self.attention = attention
        self.sampler = DenoisingSampler(config, g.mask_id, g.suppress_ids(suppress_tokens),
                                        eos_token_id=g.sep_id if stop_at_eos else None)
        self.notes: list[str] = self.sampler.set_timesteps(config.steps, editable)
        # particle j of sample i draws from seed + i + j * PARTICLE_SEED_STRIDE: particle 0 is the unguided sample's
        generators = [torch.Generator().manual_seed(seed + r // particles + (r % particles) * PARTICLE_SEED_STRIDE)
                      for r in range(len(templates))]
        self.state = DenoisingState(x=x, editable=editable, generators=generators, allowed=allowed)
        self.start_x = x
        self.ancestors: torch.Tensor | None = None  # [rows] after a resampling step: the row each row continues
        self.kept: torch.Tensor | None = None  # [samples] when done with particles: the rows that are the samples
        self.max_iterations = int(editable.sum(1).max()) * 2 + self.sampler.num_steps  # a hard stop, never reached
        self.iterations = 0
        self.cached = False  # set by the run: the group's rows live in the run's key/value cache
        self.trace = [x.cpu().clone()] if return_trace else None
        self.keep_logits = False  # the engine sets it to stream each step's confidence
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (needed, before, logits)
        special = [i for i in (g.cls_id, g.sep_id, g.pad_id) if i is not None]
        self._unconditional = None
        if cfg_scale:  # the prompt masked out: the same rows without their condition
            keep = ~editable & ~torch.isin(x, torch.tensor(special, device=x.device))
            self._unconditional = keep
        self._mask_id = g.mask_id
        self.done = False

    @property
    def rows(self) -> int:
        """Rows in a model call: the samples, twice with guidance."""
        return self.state.x.shape[0] * (2 if self.cfg_scale else 1)

    @property
    def length(self) -> int:
        return self.state.x.shape[1]

    def advance_to_call(self) -> bool:
        """Skip the steps that commit nothing (no model call, the clock moves); True when the next step needs
        the model, False when the group is done."""
        sampler = self.sampler
        while self.iterations < self.max_iterations:
            if sampler.done(self.state):
                break
            if bool(sampler.plan(self.state).any()):
                return True
            self.state = sampler.skip(self.state)
            self.iterations += 1
            if self.trace is not None:
                self.trace.append(self.state.x.cpu().clone())
        if self.guider is not None:
            self.kept = self.guider.survivors(self)
        self.done = True
        return False

    def model_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, region, needed), each [rows, l]: what this group puts into the model call."""
        st = self.state
        region = self.sampler.region(st)  # [b, l]
        needed = self.sampler.needed_positions(st, region)  # [b, l]
        if not self.cfg_scale:
            return st.x, region, needed
        uncond = st.x.masked_fill(self._unconditional, self._mask_id)
        return torch.cat([st.x, uncond]), torch.cat([region, region]), torch.cat([needed, needed])

    def model_attention(self) -> torch.Tensor:
        return torch.cat([self.attention, self.attention]) if self.cfg_scale else self.attention

    def apply(self, logits: torch.Tensor) -> None:
        """One sampler step from the logits [n, V] at this group's needed positions (row-major over its rows)."""
        if self.cfg_scale:
            cond, unc = logits.chunk(2)  # the samples' rows come first
            logits = unc + (1 + self.cfg_scale) * (cond - unc)  # LLaDA's form: cfg_scale 0 is the conditional model
        st = self.state
        if self.guider is not None:
            logits = self.guider.adjust(self, logits)
        if self.keep_logits:
            self.last = (self.sampler.needed_positions(st), st.x, logits)
        self.state = self.sampler.step(logits, dataclasses.replace(st, nfe=st.nfe + 1))
        self.ancestors = self.guider.after_step(self) if self.guider is not None else None
        if self.ancestors is not None:
            self._reorder(self.ancestors)
        self.iterations += 1
        if self.trace is not None:
            self.trace.append(self.state.x.cpu().clone())
        if self.on_step is not None:
            self.on_step(self.state.nfe, self.state)


    def _reorder(self, rows: torch.Tensor) -> None:
        """Row r continues row ``rows[r]`` (particles resampled): tokens and per-row settings move with it;
        each row keeps its own generator, so copies of one particle part ways at the next step."""
        st, index = self.state, rows.to(self.state.x.device)
        allowed = st.allowed[index] if st.allowed is not None and st.allowed.dim() == 3 else st.allowed
        self.state = dataclasses.replace(st, x=st.x[index], editable=st.editable[index], allowed=allowed)
        self.attention = self.attention[index]
        if self._unconditional is not None:
            self._unconditional = self._unconditional[index]

    def output(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, editable, attention) of the group's samples: every row, or the kept particle of each sample."""
        st = self.state
        if self.kept is None:
            return st.x, st.editable, self.attention
        index = self.kept.to(st.x.device)
        return st.x[index], st.editable[index], self.attention[index]


class DenoisingRun:
    """A batch of groups denoised together, one model call per step; groups join and leave between steps."""

    def __init__(self, generator, cache: str = "auto", cache_refresh: str = "block"):
        """``generator``: a ``pipelines.generation.DiffusionGenerator`` (model, tokenizer, templates, decoding)."""
        if cache not in CACHE_CHOICES:
            raise UsageError(f"--cache must be one of {CACHE_CHOICES}, got {cache!r}.", field="cache", value=cache)
        if cache_refresh not in REFRESH:
            raise UsageError(f"cache_refresh must be one of {REFRESH}, got {cache_refresh!r}.", field="cache_refresh",
                             value=cache_refresh)
        self.g, self.cache, self.cache_refresh = generator, cache, cache_refresh
        # the denoiser, not the bare model: an adapted causal LM's wrapper says its logits are shifted
        self.unsupported = cache_support(generator.denoiser)  # None, or why the architecture cannot use the cache
        # a block-diffusion model (models/block.py) always decodes through its exact block cache
        self.block_size = getattr(generator.denoiser, "block_size", None) if getattr(
            generator.denoiser, "block_causal", False) else None
        self.groups: list[DenoisingGroup] = []  # in the order they joined; cached ones own the kv rows in that order
        self.kv: DenoisingKVCache | None = None
        self.model_calls = 0
        self.last_call_rows = 0

    # -- joining and leaving -------------------------------------------------------------------------------
    def add(self, templates: Sequence[str], config: SamplerConfig, **kwargs) -> DenoisingGroup:
        """Start denoising ``templates`` (one row each) with ``config``: ``new_group`` then ``join``."""
        return self.join(self.new_group(templates, config, **kwargs))

    def new_group(self, templates: Sequence[str], config: SamplerConfig, **kwargs) -> DenoisingGroup:
        """A group, validated and tokenised, not yet in the run: the server builds it on a request's own thread
        (a bad request fails there) and the engine's thread joins it between steps. ``kwargs``: those of
        :class:`DenoisingGroup` (seed, cfg_scale, suppress_tokens, stop_at_eos, max_length, allowed,
        return_trace, on_step, guider)."""
        if self.block_size:
            config = self._block_config(config, kwargs)
        group = DenoisingGroup(self.g, templates, config, **kwargs)
        if self.block_size:
            editable, x = group.state.editable, group.state.x
            columns = torch.arange(x.shape[1], device=x.device)
            last = torch.where(editable, columns, -1).max(1, keepdim=True).values
            text_after = (columns > last) & group.attention.bool() & (x != self.g.sep_id)
            if not torch.equal(continuation(editable), editable) or bool(text_after.any()):
                raise UsageError("this block-diffusion model writes left to right (it sees only the text before a "
                                 "block): infilling, a masked span with text after it, cannot apply; give a prompt "
                                 "to continue.", field="template", value=list(templates)[0])
            group.cached = True
            return group
        reason = self._cache_refusal(config)
        if reason is not None and self.cache not in ("none", "auto"):
            group.notes.append(f"{reason}: generating without the cache.")
        group.cached = reason is None
        return group

    def join(self, group: DenoisingGroup) -> DenoisingGroup:
        """Put a group into the run; from the next ``step`` on it shares the model calls."""
        if group.cached:
            if self.kv is None and self.block_size and self.g.denoiser.shifted_logits:  # a causal LM's blocks
                self.kv = BlockKVCache(self.g.denoiser, self.g.pad_id, self.g.mask_id)
            elif self.kv is None and self.block_size:  # an encoder's blocks (models/block.EncoderBlockDiffusionLM)
                self.kv = DenoisingKVCache(self.g.denoiser, "block", block_size=self.block_size)
            elif self.kv is None:
                mode = "dual" if self.cache == "auto" else self.cache
                self.kv = DenoisingKVCache(self.g.denoiser, mode, self.cache_refresh)
            self.kv.add_rows(group.rows, group.length, self.g.device)
        self.groups.append(group)
        return group

    def _block_config(self, config: SamplerConfig, kwargs: dict) -> SamplerConfig:
        """A block model's settings: its trained block size as the block length; refuse what needs the right side."""
        if kwargs.get("cfg_scale"):
            raise UsageError("classifier-free guidance puts the condition before the text and masks it out; a "
                             "block-diffusion model sees only the left, so --cfg-scale cannot apply (classifier or "
                             "SMC guidance can).", field="cfg_scale", value=kwargs["cfg_scale"])
        if config.block_length not in (None, self.block_size):
            raise UsageError(f"--block-length {config.block_length}: this block-diffusion model was trained with "
                             f"blocks of {self.block_size} and decodes with them (leave --block-length unset).",
                             field="block_length", value=config.block_length)
        if self.cache == "none":
            raise UsageError("--cache none: a block-diffusion model decodes through its exact block cache (the "
                             "finished blocks are never recomputed); leave --cache at auto.", field="cache",
                             value="none")
        return dataclasses.replace(config, block_length=self.block_size)

    def _cache_refusal(self, config: SamplerConfig) -> str | None:
        """None when a group with these settings keeps its rows in the cache, else why not."""
        if self.cache == "none":
            return "--cache none"
        if config.block_length is None:
            if self.cache != "auto":  # asked for by name: the caller must give blocks
                raise UsageError(f"--cache {self.cache} reuses keys/values within a block: it needs --block-length "
                                 "(e.g. --block-length 32), got none.", field="block_length", value=None)
            return "no blocks"
        return self.unsupported

    def remove(self, group: DenoisingGroup) -> None:
        """Take a group out (finished or cancelled); the other cached rows keep their keys and values."""
        if group not in self.groups:
            return
        if group.cached and self.kv is not None:
            keep, start = [], 0
            for other in self.groups:
                if other.cached:
                    if other is not group:
                        keep.extend(range(start, start + other.rows))
                    start += other.rows
            self.kv.keep_rows(torch.tensor(keep, dtype=torch.long, device=self.g.device))
        self.groups.remove(group)

    # -- one step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, only: set[int] | None = None) -> list[DenoisingGroup]:
        """One tick: every group skips what needs no model call; the rest share one model call (two when some
        groups are cached and others are not) and step. ``only``: the ids of the groups that may step this tick
        (the server's fair sharing); the others wait. Returns the groups that stepped."""
        ready = [grp for grp in self.groups
                 if (only is None or grp.id in only) and not grp.done and grp.advance_to_call()]
        if not ready:
            return []
        cached = [grp for grp in ready if grp.cached]
        plain = [grp for grp in ready if not grp.cached]
        logits: dict[int, torch.Tensor] = {}
        rows = 0
        if cached:
            logits.update(self._cached_call(cached))
            rows += sum(grp.rows for grp in cached)
        if plain:
            logits.update(self._plain_call(plain))
            rows += sum(grp.rows for grp in plain)
        self.model_calls += 1
        self.last_call_rows = rows
        for grp in ready:
            grp.apply(logits[grp.id])
            if grp.ancestors is not None and grp.cached:
                self._reorder_cache(grp, grp.ancestors)
        return ready

    def _reorder_cache(self, group: DenoisingGroup, rows: torch.Tensor) -> None:
        """The cached keys/values of ``group``'s rows follow its resampled particles (``rows``: the ancestor of
        each); every other group's rows stay where they are."""
        start = 0
        for other in self.groups:
            if other is group:
                break
            if other.cached:
                start += other.rows
        total = sum(other.rows for other in self.groups if other.cached)
        own = torch.cat([rows, rows + len(rows)]) if group.cfg_scale else rows  # the guided pass's rows follow too
        index = torch.arange(total)
        index[start:start + group.rows] = start + own
        self.kv.keep_rows(index.to(self.g.device))

    def _cached_call(self, ready: list[DenoisingGroup]) -> dict[int, torch.Tensor]:
        """Logits of the ready cached groups. Every cached group has rows in the cache; the ones not ready this
        tick join the call with no needed position (they cost nothing and keep their keys/values)."""
        length = self.kv.length
        xs, atts, regions, needs = [], [], [], []
        ready_ids = {grp.id for grp in ready}
        for grp in self.groups:
            if not grp.cached:
                continue
            x, region, needed = grp.model_rows() if grp.id in ready_ids else self._idle_rows(grp)
            xs.append(_pad(x, length, self.g.pad_id))
            atts.append(_pad(grp.model_attention(), length, 0))
            regions.append(_pad(region, length, False))
            needs.append(_pad(needed, length, False))
        out = self.kv.logits(torch.cat(xs), torch.cat(atts), torch.cat(regions), torch.cat(needs))  # [n, V]
        return self._split(out, [grp for grp in self.groups if grp.cached], needs, ready_ids)

    def _idle_rows(self, grp: DenoisingGroup):
        x = grp.state.x if not grp.cfg_scale else torch.cat([grp.state.x, grp.state.x])
        none = torch.zeros_like(x, dtype=torch.bool)
        return x, none, none

    def _plain_call(self, ready: list[DenoisingGroup]) -> dict[int, torch.Tensor]:
        """Logits of the groups outside the cache: one masked-positions forward over their right-padded rows
        (the compiled full forward when the generator was built with ``compile=True`` and no row is guided)."""
        length = max(grp.length for grp in ready)
        parts = [grp.model_rows() for grp in ready]
        x = torch.cat([_pad(p[0], length, self.g.pad_id) for p in parts])  # [B, L]
        attention = torch.cat([_pad(grp.model_attention(), length, 0) for grp in ready])  # [B, L]
        needs = [_pad(p[2], length, False) for p in parts]
        positions = torch.cat(needs)  # [B, L]
        if self.g._compiled is not None:
            full = self.g._compiled(x, attention if not bool(attention.all()) else None)  # [B, L, V]
            out = full[positions].clone()  # copy out: a CUDA graph reuses its output buffer
        else:
            out = masked_logits(self.g.denoiser, x, attention, positions)  # [n, V] row-major over the batch
        return self._split(out, ready, needs, {grp.id for grp in ready})

    @staticmethod
    def _split(logits: torch.Tensor, groups: list[DenoisingGroup], needs: list[torch.Tensor],
               wanted: set[int]) -> dict[int, torch.Tensor]:
        """Each group's contiguous slice of the row-major logits [n, V]."""
        pieces = torch.split(logits, [int(n.sum()) for n in needs])
        return {grp.id: piece for grp, piece in zip(groups, pieces) if grp.id in wanted}

    # -- results -------------------------------------------------------------------------------------------
    def result(self, group: DenoisingGroup) -> GenerationOutput:
        st = group.state
        x, editable, _ = group.output()
        texts = [self.g.decode(row, ed, group.stop_at_eos) for row, ed in zip(x.cpu(), editable.cpu())]
        return GenerationOutput(texts=texts, nfe=st.nfe, steps=group.sampler.num_steps, token_ids=x.cpu(),
                                trace=group.trace or [], notes=group.notes, config=group.config)

    def run_to_end(self) -> None:
        """Step until every group is done (what ``generate`` does with its single group)."""
        while any(not grp.done for grp in self.groups):
            self.step()


def _pad(t: torch.Tensor, length: int, value) -> torch.Tensor:
    """Right-pad [b, l] to [b, length]."""
    if t.shape[1] == length:
        return t
    out = torch.full((t.shape[0], length), value, dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out
