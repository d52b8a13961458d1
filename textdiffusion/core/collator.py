"""The variable-masking collator: the one place that decides which tokens are masked during training.

A standard masked LM sees one corruption level (15%). A text diffusion model must see *every* level,
so for each batch (or each example) this collator draws a corruption level and replaces that fraction
of the maskable tokens by the mask token (no 80/10/10 replacement: the model must learn to denoise
exactly what generation shows it, which is masks). Two ways to draw the level:

* ``time_sampling="grid"`` (the original design): a mask probability drawn uniformly from
  ``mask_probs`` (default 0.1, 0.2, ... 1.0), once per batch or once per example.
* continuous time (``"uniform"``, ``"antithetic"``, ``"stratified"``): a time t in [t_min, 1] drawn for
  *every example* (as MDLM's ``_sample_t(n)``; ``mask_per`` applies to the grid only), masked with
  probability ``schedule.mask_ratio(t)``. Antithetic/stratified draws spread the batch's t evenly over
  [0, 1], which lowers the variance of the ELBO estimate (MDLM's low-discrepancy sampler).

With ``loss_weighting="elbo"`` each example carries the weight -alpha'(t)/(1-alpha(t)) (1/t for the
linear schedule), so the training loss is the negative ELBO: a Monte-Carlo estimate of its integral over
t in continuous time, and a *Riemann sum* of it over the grid's levels in grid mode (the mask probability
plays the role of t under the linear schedule), only as fine as the grid. ``"none"`` is the original plain cross-entropy on masked tokens.

Never masked: the first ``prefix_length`` positions (or a random prefix per example, so that prompts of
any length are in distribution), the tokens in ``protected_token_ids`` (special tokens), and padding.
End-of-text is the exception that teaches a model to stop: with ``eos_token_id`` set, the separators
between packed documents (and the end-of-text padding after a document that ends its block) are targets
like any token; only the block's closing separator in the last position stays fixed, as it is at
generation time.

Everything is one tensor operation over the batch. The randomness of batch number j comes from a
generator seeded with (seed, j): a run resumed at step s sets ``batch_offset = s`` and draws exactly
the masks the uninterrupted run would have drawn (``kill -9`` + ``--resume`` gives the same model).

``gather_buckets`` > 0 (set by ``train --compile``) also returns ``masked_index``: the flat indices of the
masked positions, padded to the next of ``gather_buckets`` fixed sizes, with ``masked_targets`` (-100 on
the padding). The model then gathers hidden states with a tensor of one of a few static shapes, so
``torch.compile`` keeps the LM head on masked positions only, instead of breaking the graph on a
boolean index whose size changes every batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import get_worker_info

from textdiffusion.config import DEFAULT_MASK_PROBS, CorruptionConfig
from textdiffusion.errors import UsageError
from textdiffusion.schedules import get_schedule

IGNORE_INDEX = -100


@dataclass
class DiffusionCollator:
    """Turn a list of token blocks into a masked training batch.

    Returns ``input_ids`` (masked), ``labels`` (the original id where masked, -100 elsewhere),
    ``attention_mask``, ``mask_rate`` (the per-example masking probability used), ``loss_weight``
    (per example) and ``num_maskable`` (per example: the ELBO is normalised by it).
    """

    mask_token_id: int
    pad_token_id: int
    protected_token_ids: Sequence[int] = ()
    time_sampling: str = "grid"
    mask_probs: Sequence[float] = DEFAULT_MASK_PROBS
    mask_per: str = "batch"
    schedule: str = "linear"
    t_min: float = 1e-3
    loss_weighting: str = "none"
    prefix_length: int = 5
    random_prefix_max: int = 0
    seed: int = 0
    gather_buckets: int = 0
    eos_token_id: int | None = None  # a training target (see the module docstring); None: protected
    # class-conditional training (labels.py): the share of rows whose label token (at ``label_position``) is
    # masked and predicted as well, its cross-entropy weighted ``label_target_weight`` times a text token's
    label_target: float = 0.0
    label_token_ids: Sequence[int] = ()
    label_position: int = 1
    label_target_weight: float = 1.0
    batch_offset: int = 0  # index of the first batch this collator produces (set on resume)
    _calls: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mask_token_id is None:
            raise ValueError("`mask_token_id` is None: the tokenizer has no mask token, so it cannot be "
                             "used for masked diffusion. Pick a masked-LM tokenizer or use --preset.")
        # the corruption settings are validated in one place: CorruptionConfig
        CorruptionConfig(time_sampling=self.time_sampling, mask_probs=list(self.mask_probs), mask_per=self.mask_per,
                         schedule=self.schedule, t_min=self.t_min, loss_weighting=self.loss_weighting,
                         prefix_length=self.prefix_length, random_prefix_max=self.random_prefix_max)
        self.mask_probs = tuple(float(p) for p in self.mask_probs)
        self.schedule_fn = get_schedule(self.schedule)
        protected = {int(i) for i in self.protected_token_ids if i is not None} - {self.eos_token_id}
        self._protected = torch.tensor(sorted(protected), dtype=torch.long)
        self._label_ids = torch.tensor([int(i) for i in self.label_token_ids], dtype=torch.long)

    # -- randomness -------------------------------------------------------------------------------
    def batch_index(self) -> int:
        """The number of the batch being collated: counted per dataloader worker, which serve batches
        round-robin (worker w of W makes batches w, w + W, ...), from ``batch_offset``."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        local = self._calls.get(worker, 0)
        self._calls[worker] = local + 1
        return self.batch_offset + worker + workers * local

    def generator(self) -> torch.Generator:
        """The generator of the next batch, seeded by (seed, batch number): reproducible after a resume."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch_index())

    def reseed(self, seed: int, batch_offset: int = 0) -> None:
        """Restart the random stream (e.g. with seed + rank under DDP, or at a resumed step)."""
        self.seed, self.batch_offset = seed, batch_offset
        self._calls.clear()

    # -- the corruption level ---------------------------------------------------------------------
    def sample_mask_rate(self, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (mask probability, ELBO weight), both [b] float32."""
        n = 1 if self.mask_per == "batch" and self.time_sampling == "grid" else batch_size
        if self.time_sampling == "grid":
            grid = torch.tensor(self.mask_probs)
            rate = grid[torch.randint(len(grid), (n,), generator=g)]  # [n]
            weight = 1.0 / rate  # linear schedule: t = rate, -alpha'/(1-alpha) = 1/t
        else:
            if self.time_sampling == "uniform":
                u = torch.rand(n, generator=g)
            elif self.time_sampling == "antithetic":  # one offset, evenly spaced (mod 1)
                u = (torch.rand(1, generator=g) + torch.arange(n) / n) % 1.0
            else:  # stratified: one draw inside each of n equal strata, in random order
                u = (torch.arange(n) + torch.rand(n, generator=g)) / n
                u = u[torch.randperm(n, generator=g)]
            t = self.t_min + (1.0 - self.t_min) * u  # [n]
            rate = self.schedule_fn.mask_ratio(t)
            weight = self.schedule_fn.weight(t)
        if self.loss_weighting == "none":
            weight = torch.ones_like(rate)
        return rate.expand(batch_size).float(), weight.expand(batch_size).float()

    def prefix_lengths(self, batch_size: int, g: torch.Generator) -> torch.Tensor:
        """Per-example number of leading positions that are never masked, [b]."""
        if self.random_prefix_max:
            return torch.randint(self.prefix_length, self.random_prefix_max + 1, (batch_size,), generator=g)
        return torch.full((batch_size,), self.prefix_length)

    # -- the batch --------------------------------------------------------------------------------
    def pad(self, examples: Sequence[Any]) -> torch.Tensor:
        rows = [torch.as_tensor(e["input_ids"] if isinstance(e, dict) else e, dtype=torch.long) for e in examples]
        if not rows:
            raise ValueError("cannot collate an empty list of examples.")
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)

    def maskable(self, input_ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """[b, l] bool: positions the collator may mask."""
        positions = torch.arange(input_ids.shape[1])  # [l]
        allowed = positions[None, :] >= prefix[:, None]  # [b, l]
        allowed &= input_ids != self.pad_token_id
        if len(self._protected):
            allowed &= ~torch.isin(input_ids, self._protected)
        if self.eos_token_id is not None:
            allowed[:, -1] = False  # the block's closing separator: fixed, as at generation time
        return allowed

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        g = self.generator()
        input_ids = self.pad(examples)  # [b, l]
        b = input_ids.shape[0]
        rate, weight = self.sample_mask_rate(b, g)  # [b], [b]
        maskable = self.maskable(input_ids, self.prefix_lengths(b, g))  # [b, l]
        masked = (torch.rand(input_ids.shape, generator=g) < rate[:, None]) & maskable  # [b, l]
        position_weight = None
        if self.label_target:  # after the text's draw, so the text's masks do not depend on this setting
            slot = input_ids[:, self.label_position]  # [b]
            targeted = torch.isin(slot, self._label_ids)
            targeted &= torch.rand(b, generator=g) < self.label_target  # a row without its label never is
            masked[:, self.label_position] |= targeted
            position_weight = torch.ones(input_ids.shape)
            position_weight[:, self.label_position] = self.label_target_weight
        labels = torch.where(masked, input_ids, IGNORE_INDEX)
        batch = {
            "input_ids": input_ids.masked_fill(masked, self.mask_token_id),
            "attention_mask": (input_ids != self.pad_token_id).long(),
            "labels": labels,
            "mask_rate": rate,
            "loss_weight": weight,
            "num_maskable": maskable.sum(1),
        }
        if position_weight is not None:
            batch["position_weight"] = position_weight
        if self.gather_buckets:
            batch["masked_index"], batch["masked_targets"] = bucketed_index(labels, self.gather_buckets)
        return batch


def bucketed_index(labels: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices [n_bucket] of the masked positions of ``labels`` [b, l], padded with index 0 up to the
    smallest multiple of b*l/buckets that holds them, and their targets with -100 on the padding."""
    flat = labels.flatten()
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # [n]
    unit = -(-flat.numel() // buckets)
    size = max(unit, -(-index.numel() // unit) * unit)
    padded = torch.zeros(size, dtype=torch.long)
    padded[: index.numel()] = index
    targets = torch.full((size,), IGNORE_INDEX, dtype=torch.long)
    targets[: index.numel()] = flat[index]
    return padded, targets


def collator_from_config(tokenizer, corruption: CorruptionConfig, training: bool = True, **kwargs) -> DiffusionCollator:
    """The collator of a run's corruption settings. ``training=False`` gives the evaluation collator: the
    same protected prefix, but end-of-text conditioned on rather than scored, so validation numbers stay
    comparable across runs and with the AR baseline."""
    if not training:
        return collator_for_tokenizer(tokenizer, prefix_length=corruption.prefix_length, **kwargs)
    keys = ("time_sampling", "mask_per", "schedule", "t_min", "loss_weighting", "prefix_length", "random_prefix_max")
    settings = {k: getattr(corruption, k) for k in keys}
    return collator_for_tokenizer(tokenizer, learn_eos=corruption.learn_eos, mask_probs=tuple(corruption.mask_probs),
                                  **settings, **kwargs)


def collator_for_tokenizer(tokenizer, learn_eos: bool = False, **kwargs) -> DiffusionCollator:
    """A collator that protects every special token of ``tokenizer`` except the mask token, and with
    ``learn_eos`` except end-of-text (the document separator), which then becomes a training target."""
    if tokenizer.mask_token_id is None:
        raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no mask token: "
                         "it cannot be used for masked diffusion. Use a masked-LM tokenizer or --preset.")
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.mask_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    eos = None
    if learn_eos:
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return DiffusionCollator(mask_token_id=tokenizer.mask_token_id, pad_token_id=pad,
                             protected_token_ids=special, eos_token_id=eos, **kwargs)
