"""Noise schedules: how much of the text is masked at diffusion time t.

Time runs from t=0 (clean text) to t=1 (everything masked). A schedule is the pure function
alpha(t) = probability that a token is still *unmasked* at time t, so the mask ratio is 1 - alpha(t).
Everything else is derived here, once, and shared by training and generation:

* the collator samples t and masks each token with probability ``mask_ratio(t)``;
* the ELBO loss weight of a masked token is ``-alpha'(t) / (1 - alpha(t))`` (MDLM, Sahoo et al. 2024;
  for the linear schedule this is exactly 1/t);
* the sampler walks t from 1 to 0 and keeps ``mask_ratio(t)`` of the generated positions masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Schedule:
    """Base class. Subclasses implement ``alpha`` and ``alpha_prime`` analytically."""

    name: str = "base"

    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def alpha_prime(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def mask_ratio(self, t: Tensor) -> Tensor:
        """Probability that a token is masked at time t; 0 at t=0, 1 at t=1, non-decreasing."""
        return 1.0 - self.alpha(t)

    def weight(self, t: Tensor) -> Tensor:
        """ELBO weight of a masked token's cross-entropy at time t: -alpha'(t) / (1 - alpha(t))."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t)).clamp_min(1e-12)


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """alpha(t) = 1 - t: the mask ratio grows linearly; the ELBO weight is 1/t."""

    name: str = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """alpha(t) = cos(pi t / 2): few tokens are revealed early in generation, many late (MaskGIT)."""

    name: str = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


@dataclass(frozen=True)
class PolynomialSchedule(Schedule):
    """alpha(t) = 1 - t**exponent (exponent 1 is linear; 2 masks less at small t)."""

    name: str = "polynomial"
    exponent: float = 2.0

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t.pow(self.exponent)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -self.exponent * t.pow(self.exponent - 1.0)


@dataclass(frozen=True)
class ExponentialSchedule(Schedule):
    """mask_ratio(t) = (exp(k t) - 1) / (exp(k) - 1): the mask ratio stays low for most of the way and
    rises steeply near t=1, so generation commits many tokens in its first steps and few at the end."""

    name: str = "exponential"
    rate: float = 5.0

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - torch.expm1(self.rate * t) / math.expm1(self.rate)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -self.rate * torch.exp(self.rate * t) / math.expm1(self.rate)


SCHEDULES: dict[str, Schedule] = {
    "linear": LinearSchedule(),
    "cosine": CosineSchedule(),
    "polynomial": PolynomialSchedule(),
    "exponential": ExponentialSchedule(),
}


def get_schedule(name: str | Schedule) -> Schedule:
    """Look a schedule up by name; a ``Schedule`` instance is returned unchanged."""
    if isinstance(name, Schedule):
        return name
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"`schedule` must be one of {sorted(SCHEDULES)}, got {name!r}.") from None
