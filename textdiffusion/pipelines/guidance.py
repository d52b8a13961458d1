"""Guidance by a classifier of noised text (``models/guide.py``): steering a denoising run toward a label.

    generate --label rivers --guidance classifier --guide runs/topics-guide --guidance-scale 2
    generate --label rivers --guidance smc --guide runs/topics-guide --particles 8

Three methods, one name each (``GUIDANCE``); ``cfg`` is classifier-free guidance, which needs no guide and
lives in ``DenoisingGroup`` as the second, label-masked pass (``--cfg-scale``). The two below are a
:class:`Guider` a group calls around its sampler step; both work with any commit rule and ``--block-length``.

* ``classifier`` — **first-order (Taylor-approximated) classifier guidance** (Nisonoff et al. 2024, TAG;
  Schiff et al. 2024). Exact guidance multiplies the denoiser's proposal for token v at a masked position by
  p(y | x with v there) / p(y | x); that needs one classifier call per (position, token). The first-order
  approximation needs one forward and one backward of the guide per step: with ``g`` the gradient of
  log p(y | x_t) with respect to the position's input embedding, log p(y | x[pos := v]) - log p(y | x_t) ≈
  g · (E[v] - E[x_pos]) for every masked position and every token at once (``NoisyClassifier.token_deltas``).
  The step's logits become ``logits + scale * delta`` before the sampler processes them, so the proposal,
  its confidence and the order all see the guided distribution.
* ``smc`` — **particles** (twisted sequential Monte Carlo). Each sample becomes ``particles`` rows denoised
  by the (unguided, or label-conditioned) model; after every step with a model call each particle is
  weighted by ``(p(y | x_t) / p(y | x_{t+1}))^scale`` — its guide probability now over its ancestor's — and
  the particles of each sample are resampled (systematic resampling, from a generator seeded by the request's
  seed). When the run ends the particle the guide finds most likely to be of class y is the sample.

**The key/value cache.** The denoiser's forward is unchanged by both, so its cache (``--cache auto|dual|
prefix`` with ``--block-length``) still applies: the guide runs apart from it, one full forward (and for
``classifier`` a backward) over every row each step — the guide is what cannot use a cache, since its
gradient must reach every masked position and its reading of the row changes everywhere a token is
committed. ``smc`` moves particles between steps, so the run gathers the cached rows of each resampled
particle from its ancestor (``DenoisingRun._reorder_cache``), which is exact: a particle and its ancestor
hold the same tokens when they part.
"""

from __future__ import annotations

from typing import Sequence

import torch

from textdiffusion.core.labels import check_labels, label_token
from textdiffusion.errors import UsageError
from textdiffusion.models.guide import NoisyClassifier

GUIDANCE = ("cfg", "classifier", "smc")
MAX_PARTICLES = 64


class Guider:
    """What a guided group (a ``pipelines.denoising.DenoisingGroup``, not imported: denoising imports this
    module, and a type-only import back would be a cycle) does around its sampler step. ``particles``: rows
    per sample."""

    particles = 1

    def adjust(self, group, logits: torch.Tensor) -> torch.Tensor:
        """The logits [n, V] at the group's needed positions, steered (before the sampler's processing)."""
        return logits

    def after_step(self, group) -> torch.Tensor | None:
        """After a step with a model call: the rows [rows] each row now continues (its ancestor), or None."""
        return None

    def survivors(self, group) -> torch.Tensor | None:
        """When the group is done: the rows [samples] that are its samples, or None for all of them."""
        return None


class ClassifierGuidance(Guider):
    """First-order classifier guidance: logits + scale * (first-order change of log p(y | x))."""

    def __init__(self, guide: NoisyClassifier, label: str, scale: float):
        self.guide, self.scale = guide, scale
        self.y = guide.label_index(label)

    def adjust(self, group, logits):
        st = group.state
        needed = group.sampler.needed_positions(st)  # [b, l] the rows of ``logits``, row-major
        if not bool(needed.any()):
            return logits
        y = torch.full((st.x.shape[0],), self.y, dtype=torch.long)
        delta = self.guide.token_deltas(st.x, group.attention, y, needed).to(logits.device)  # [n, V_guide]
        vocab = min(delta.shape[1], logits.shape[1])  # a denoiser's padded vocabulary gets no push beyond the guide's
        steered = logits.float().clone()
        steered[:, :vocab] += self.scale * delta[:, :vocab]
        return steered


class ParticleGuidance(Guider):
    """Twisted SMC: ``particles`` rows per sample, resampled after each step by the guide's probability ratio."""

    def __init__(self, guide: NoisyClassifier, label: str, scale: float, particles: int, seed: int):
        self.guide, self.scale, self.particles = guide, scale, particles
        self.y = guide.label_index(label)
        self.seed = seed
        self.previous: torch.Tensor | None = None  # [rows] log p(y | x) of each particle's last state
        self.generators: list[torch.Generator] | None = None  # one per sample, for its resampling

    def _log_p(self, group) -> torch.Tensor:
        return self.guide.log_probs(group.state.x, group.attention)[:, self.y].cpu()  # [rows]

    def after_step(self, group):
        n, P = group.state.x.shape[0] // self.particles, self.particles
        if self.previous is None:
            self.previous = self._log_p_start(group)
            self.generators = [torch.Generator().manual_seed(self.seed + i + 7_919) for i in range(n)]
        now = self._log_p(group)  # [rows]
        log_w = (self.scale * (now - self.previous)).view(n, P).double()  # [n, P] the incremental weights
        ancestors = systematic_resample(log_w, self.generators)  # [n, P] within each sample
        rows = (ancestors + torch.arange(n)[:, None] * P).flatten()  # [rows] global row of each ancestor
        self.previous = now[rows]
        return rows

    def _log_p_start(self, group) -> torch.Tensor:
        """log p(y | x) of the rows before the first step (every particle of a sample starts alike)."""
        return self.guide.log_probs(group.start_x, group.attention)[:, self.y].cpu()

    def survivors(self, group):
        n, P = group.state.x.shape[0] // self.particles, self.particles
        best = self._log_p(group).view(n, P).argmax(1)  # [n] the first of the most likely
        return best + torch.arange(n) * P


def systematic_resample(log_weights: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """[n, P] ancestor index (0..P-1) of each new particle, for log weights [n, P]: one uniform per row from
    its own generator, P evenly spaced points through the weights' cumulative sum (systematic resampling)."""
    n, P = log_weights.shape
    w = torch.softmax(log_weights, dim=1)  # [n, P]
    cdf = w.cumsum(1)
    cdf[:, -1] = 1.0  # rounding must not leave the last point beyond the sum
    u = torch.stack([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])  # [n, 1]
    points = (u + torch.arange(P, dtype=torch.float64)) / P  # [n, P]
    return torch.searchsorted(cdf, points).clamp_max(P - 1)


def _name(field: str, flag_style: str) -> str:
    return f"--{field.replace('_', '-')}" if flag_style == "--" else f"`{field}`"


def check_settings(guidance: str | None, cfg_scale: float, scale: float, particles: int, guide_given: bool,
                   label: str | None, flag_style: str = "--") -> None:
    """The checks that need no model (the CLI makes them before loading one): the method's name, the strength,
    the particle count, cfg's scale, and that classifier/smc have a guide and a label."""
    def name(f: str) -> str:
        return _name(f, flag_style)

    if guidance is not None and guidance not in GUIDANCE:
        raise UsageError(f"{name('guidance')} must be one of {GUIDANCE}, got {guidance!r}.", field="guidance", value=guidance)
    if not (scale >= 0 and scale < float("inf")):
        raise UsageError(f"{name('guidance_scale')} must be a finite number >= 0, got {scale!r}.", field="guidance_scale",
                         value=scale)
    if not 1 <= particles <= MAX_PARTICLES:
        raise UsageError(f"{name('particles')} must be in [1, {MAX_PARTICLES}], got {particles}.", field="particles",
                         value=particles)
    if guidance == "cfg" and not cfg_scale:
        raise UsageError(f"{name('guidance')} cfg needs {name('cfg_scale')} > 0 (its strength).", field="cfg_scale",
                         value=cfg_scale)
    if guidance in ("classifier", "smc"):
        if not guide_given:
            raise UsageError(f"{name('guidance')} {guidance} needs a guide ({name('guide')} DIR, trained by "
                             "`textdiffusion train-guide`).", field="guide", value=None)
        if label is None:
            raise UsageError(f"{name('guidance')} {guidance} needs {name('label')}: the class to steer toward.",
                             field="label", value=None)


def check_method(guidance: str | None, cfg_scale: float, guide: NoisyClassifier | None, label: str | None,
                 scale: float, particles: int, flag_style: str = "--") -> None:
    """Refuse a guidance request that cannot apply, naming the argument (``--guide`` / ``guide``)."""
    check_settings(guidance, cfg_scale, scale, particles, guide is not None, label, flag_style)
    if guidance in ("classifier", "smc"):
        guide.label_index(label)


def label_prefix(labels: Sequence[str] | None, label: str | None, guide: NoisyClassifier | None,
                 checkpoint: str = "the checkpoint", flag: str = "--label") -> str:
    """The text a row opens with for ``label``: the label's token on a model trained with labels, nothing on an
    unlabelled one steered by a guide. Refuses a label that neither knows (``check_labels``'s message)."""
    if label is None:
        return ""
    if guide is not None:
        guide.label_index(label)  # the guide must know it
        if not labels:
            return ""  # an unlabelled model: the guide alone steers
    check_labels(labels, [label], flag, checkpoint)
    return label_token(label)


def make_guider(guidance: str | None, guide: NoisyClassifier | None, label: str | None, scale: float,
                particles: int, seed: int) -> Guider | None:
    """The group's guider for a checked request (``check_method``); None for cfg or no guidance."""
    if guidance == "classifier":
        return ClassifierGuidance(guide, label, scale)
    if guidance == "smc":
        return ParticleGuidance(guide, label, scale, particles, seed)
    return None
