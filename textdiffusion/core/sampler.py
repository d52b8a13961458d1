"""The denoising sampler: every decision of the generation loop, with the model call kept outside.

It has the shape of a diffusers scheduler: ``set_timesteps`` fixes the plan (the step table: how much of a
block stays masked after each step), ``plan`` says how many tokens each row will commit at the next step
(so the caller can skip the forward pass when nothing would change), and ``step(logits, state)`` returns
the next state, leaving the given one untouched; the state carries the step index. Everything is one tensor operation
over the batch; the only Python loop is over rows to draw each sample's random numbers from its own
``torch.Generator``, which is what makes a sample independent of the batch it is generated in.

Time runs from t=1 (all generated positions masked) to t=0. At step i of n, the number of positions that
stay masked is ``round(schedule.mask_ratio(1 - (i+1)/n) * positions)``; the strategy decides which:

* ``remask-random`` — the original sampler: fill every masked position, then re-mask a random subset of
  all generated positions; a committed token can change at any later step.
* ``confidence`` / ``margin`` / ``entropy`` / ``random`` — carry-over unmasking (MaskGIT, LLaDA): commit
  the best-scoring sampled tokens; a committed token stays, unless ``remask_fraction`` > 0 (ReMDM-style
  self-correction re-masks the least likely committed tokens, fewer as t falls).
* ``confidence_threshold`` — commit every masked token whose probability is at least the threshold (and
  at least one per row): easy text finishes in few model calls (Fast-dLLM).
* ``eb`` — entropy-bounded unmasking (EB-sampler, arXiv 2505.24857): order the masked positions by
  entropy, lowest first, and commit the longest prefix whose summed entropy minus its largest stays
  within ``eb_gamma`` (at least one per row): as many tokens per call as the model is sure of together.
  The entropy is that of the distribution the token is drawn from (after top-k, penalty, temperature).
* ``left-to-right`` — commit the leftmost masked positions of the block (the step plan says how many): with
  one per step and a block-diffusion model, exactly the order of an autoregressive model.
* ``block_length`` — semi-autoregressive: positions are split left to right into blocks, each denoised
  with its own share of the steps before the next one starts (LLaDA).

With ``eos_token_id`` set, a committed end-of-text token ends the row's continuation (its last editable
span): every masked position after it becomes end-of-text at once, so the unused tail costs no model call
(``plan`` then finds nothing left to commit there and the loop skips or finishes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from textdiffusion.config import SamplerConfig
from textdiffusion.schedules import get_schedule

_NEG_INF = float("-inf")


@dataclass
class DenoisingState:
    """What changes from step to step. ``x`` holds mask ids where nothing is committed yet."""

    x: torch.Tensor  # [b, l] token ids
    editable: torch.Tensor  # [b, l] bool: positions the sampler may write (the masked spans of the template)
    generators: list[torch.Generator]  # one per row
    allowed: torch.Tensor | None = None  # [b, l, V] or [l, V] bool: tokens allowed at each position
    step_index: int = 0
    nfe: int = 0


class DenoisingSampler:
    def __init__(self, config: SamplerConfig, mask_token_id: int, suppress_token_ids=(), eos_token_id: int | None = None):
        self.config = config
        self.mask_token_id = mask_token_id
        self.eos_token_id = eos_token_id
        self.schedule = get_schedule(config.schedule)
        self.suppress = torch.tensor(sorted({int(i) for i in suppress_token_ids} | {mask_token_id}), dtype=torch.long)
        self.num_steps = config.steps
        self.steps_per_block = config.steps
        self.rule = commit_rule(config)
        self.keep_masked = torch.zeros(0, dtype=torch.float64)  # [steps_per_block], set by set_timesteps
        self.tail: torch.Tensor | None = None  # [b, l] each row's continuation, set by set_timesteps

    # -- the plan ---------------------------------------------------------------------------------
    def set_timesteps(self, num_steps: int, editable: torch.Tensor) -> list[str]:
        """Fix the step plan for these editable positions; returns notes for the user (e.g. clamping)."""
        notes = []
        counts = editable.sum(1)
        most = int(counts.max()) if counts.numel() else 0
        if most == 0:
            raise ValueError("there is nothing to generate: the template has no masked position.")
        span = min(most, self.config.block_length or most)
        n_blocks = math.ceil(most / span)
        per_block = max(1, num_steps // n_blocks)
        if per_block > span:
            notes.append(f"{num_steps} steps for {span} masked positions per block: clamped to {span} steps per block "
                         "(a step must commit at least one token).")
            per_block = span
        if self.config.block_length and num_steps % n_blocks:
            notes.append(f"{num_steps} steps do not divide into {n_blocks} blocks: using {per_block} steps per block.")
        self.steps_per_block, self.num_blocks = per_block, n_blocks
        self.block_span = span
        self.num_steps = per_block * n_blocks
        # the step table: after step j of a block, this fraction of the block stays masked
        t_next = 1.0 - torch.arange(1, per_block + 1, dtype=torch.float64) / per_block  # [steps_per_block]
        self.keep_masked = self.schedule.mask_ratio(t_next).double()
        self.tail = continuation(editable)  # where an end-of-text ends the row (the template never changes)
        return notes

    def blocks(self, editable: torch.Tensor) -> torch.Tensor:
        """[b, l] block index of each editable position (left to right within each row); -1 elsewhere."""
        rank = editable.long().cumsum(1) - 1  # [b, l] index of the position among the row's editable ones
        return torch.where(editable, rank // self.block_span, -1)

    def region(self, state: DenoisingState) -> torch.Tensor:
        """[b, l] bool: the positions that may be unmasked now (the current block of each row)."""
        masked = (state.x == self.mask_token_id) & state.editable
        if self.num_blocks == 1:
            return state.editable
        block = self.blocks(state.editable)  # [b, l]
        big = torch.iinfo(block.dtype).max
        current = block.masked_fill(~masked, big).min(1).values  # [b] lowest block with masks left
        return state.editable & (block == current[:, None])

    def needed_positions(self, state: DenoisingState, region: torch.Tensor | None = None) -> torch.Tensor:
        """[b, l] bool: where the next ``step`` reads logits. The model may compute only these (its LM head
        is the most expensive part at a large vocabulary); ``step`` accepts logits [n, V] for them."""
        region = self.region(state) if region is None else region
        masked = (state.x == self.mask_token_id) & region
        if self.config.remask_fraction:
            return region  # remasking also scores the committed tokens of the region
        return masked

    @property
    def adaptive(self) -> bool:
        """True when the logits decide how many tokens a step commits (threshold, eb): the loop then runs
        until no mask is left rather than for a fixed number of steps."""
        return self.config.confidence_threshold is not None or self.config.strategy == "eb"

    def plan(self, state: DenoisingState, region: torch.Tensor | None = None) -> torch.Tensor:
        """[b] number of positions each row unmasks at the next step (0: skip the model call)."""
        region = self.region(state) if region is None else region
        m = ((state.x == self.mask_token_id) & region).sum(1)
        if self.adaptive:
            return (m > 0).long()  # at least one; the threshold may add more once the logits are known
        if self.config.strategy == "remask-random":
            return torch.where(m > 0, region.sum(1) - self._target_masked(state, region), 0)
        return (m - self._target_masked(state, region)).clamp_min(0)

    def _target_masked(self, state: DenoisingState, region: torch.Tensor) -> torch.Tensor:
        """[b] how many positions of the current region should still be masked after this step (the table)."""
        keep = self.keep_masked[state.step_index % self.steps_per_block]
        return torch.round(keep * region.sum(1).double()).long()

    def skip(self, state: DenoisingState) -> DenoisingState:
        """The next state without a model call (a step that would commit nothing): only the clock moves."""
        return dataclasses.replace(state, step_index=state.step_index + 1)

    def finished(self, state: DenoisingState) -> bool:
        return not bool(((state.x == self.mask_token_id) & state.editable).any())

    def done(self, state: DenoisingState) -> bool:
        """True when the loop stops: nothing left masked, or the step plan spent (an adaptive strategy —
        threshold, eb — runs until nothing is masked instead)."""
        return self.finished(state) or (not self.adaptive and state.step_index >= self.num_steps)

    # -- turning logits into tokens ---------------------------------------------------------------
    def process_logits(self, logits: torch.Tensor, positions: torch.Tensor, state: DenoisingState) -> torch.Tensor:
        """Logits [n, V] at ``positions`` ([b, l] bool) after suppression, allowed sets, repetition penalty,
        temperature and top-k/top-p. Only the positions being sampled are processed."""
        cfg = self.config
        logits = logits.float().clone()
        logits[:, self.suppress[self.suppress < logits.shape[-1]]] = _NEG_INF
        where = positions.nonzero()  # [n, 2] (row, position)
        if state.allowed is not None:
            allowed = state.allowed.to(logits.device)
            allowed = allowed[positions] if allowed.dim() == 3 else allowed[where[:, 1]]  # [n, V]
            logits = logits.masked_fill(~allowed, _NEG_INF)
        if cfg.repetition_penalty > 1:
            present = torch.zeros(state.x.shape[0], logits.shape[-1], dtype=torch.bool, device=logits.device)
            present.scatter_(1, state.x, True)  # every token already in the row (prompt and committed)
            present[:, self.mask_token_id] = False
            penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
            logits = torch.where(present[where[:, 0]], penalised, logits)
        if cfg.sampling != "greedy":
            logits = logits / cfg.temperature
        if cfg.sampling == "topk" and cfg.top_k < logits.shape[-1]:
            kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, _NEG_INF)
        elif cfg.sampling == "nucleus" and cfg.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), _NEG_INF)
        return logits

    @staticmethod
    def _draw(generators: list[torch.Generator], length: int, device) -> torch.Tensor:
        """[b, 2, l] float64 uniforms (token sampling, order), each row from its own generator: the
        randomness of a sample does not depend on the other rows of its batch."""
        return torch.stack([torch.rand(2, length, generator=g, dtype=torch.float64) for g in generators]).to(device)

    def sample_tokens(self, logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled token [n] and its probability [n] for processed logits [n, V] and uniforms [n] (float64)."""
        if self.config.sampling == "greedy":
            probs = logits.softmax(-1)
            p, tok = probs.max(-1)
            return tok, p
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        chunk = max(1, 2 ** 24 // logits.shape[-1])  # bound the float64 CDF's memory
        for s in range(0, logits.shape[0], chunk):  # chunks of positions, not single positions
            probs = logits[s:s + chunk].double().softmax(-1)  # inverse-CDF sampling in float64
            cdf = probs.cumsum(-1)
            u = (uniforms[s:s + chunk] * cdf[:, -1]).unsqueeze(-1)
            tokens[s:s + chunk] = torch.searchsorted(cdf, u).squeeze(-1).clamp_max(logits.shape[-1] - 1)
        p = logits.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, p

    def scores(self, logits: torch.Tensor, p_sampled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """How much to trust each sampled token [n]: higher is unmasked first."""
        strategy = self.config.strategy
        score = SCORES[strategy](logits, p_sampled, noise)
        if self.config.order_temperature > 0 and strategy not in ("random", "left-to-right"):
            gumbel = -torch.log(-torch.log(noise.clamp(1e-300, 1 - 1e-16)))
            score = score.double().log() if strategy == "confidence" else score.double()
            score = (score + self.config.order_temperature * gumbel).float()
        return score

    # -- one step ---------------------------------------------------------------------------------
    def step(self, logits: torch.Tensor, state: DenoisingState) -> DenoisingState:
        """The next state: commit (and maybe re-mask) tokens given the model's logits for ``state.x``, either dense
        [b, l, V], or [n, V] at ``needed_positions(state)`` in row-major order."""
        mask_id = self.mask_token_id
        x = state.x.clone()
        region = self.region(state)  # [b, l] computed once per step, passed to everything below
        masked = (x == mask_id) & region  # [b, l]
        needed = self.needed_positions(state, region)  # [b, l]
        if logits.dim() == 2:  # sparse: scatter the rows we were given into their positions' order
            sparse, logits = logits, None
            index = torch.full(x.shape, -1, dtype=torch.long, device=x.device)
            index[needed] = torch.arange(int(needed.sum()), device=x.device)
        k = self.plan(state, region)  # [b]
        uniforms = self._draw(state.generators, x.shape[1], x.device)  # [b, 2, l]
        fill = masked  # the positions sampled this step

        def at(positions: torch.Tensor) -> torch.Tensor:  # logits [m, V] at a subset of the needed positions
            return logits[positions] if logits is not None else sparse[index[positions]]

        processed = self.process_logits(at(fill), fill, state)  # [n, V]
        tokens, p = self.sample_tokens(processed, uniforms[:, 0][fill])  # [n], [n]
        proposal = x.clone()
        proposal[fill] = tokens

        step = StepContext(state=state, x=x, region=region, masked=masked, fill=fill, proposal=proposal,
                           processed=processed, p=p, uniforms=uniforms, k=k, at=at)
        x = self.rule.commit(self, step)  # which sampled tokens stay: one rule class per unmasking rule
        if self.eos_token_id is not None:
            x = self.fill_after_eos(x, self.tail)
        return dataclasses.replace(state, x=x, step_index=state.step_index + 1)  # the given state is left as it was

    def fill_after_eos(self, x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """[b, l]: every masked position after the first end-of-text in ``tail`` ([b, l], each row's continuation,
        see ``continuation``) becomes end-of-text."""
        after_eos = ((x == self.eos_token_id) & tail).long().cumsum(1) > 0  # [b, l] the first EOS and everything after
        return x.masked_fill(after_eos & tail & (x == self.mask_token_id), self.eos_token_id)

    def _remask_count(self, state: DenoisingState, k: torch.Tensor, masked: torch.Tensor,
                      region: torch.Tensor) -> torch.Tensor:
        """ReMDM-style: re-mask ``remask_fraction * mask_ratio(t_next)`` of the committed tokens (0 at the end)."""
        if not self.config.remask_fraction:
            return torch.zeros_like(k)
        j = state.step_index % self.steps_per_block
        if j == self.steps_per_block - 1:
            return torch.zeros_like(k)
        committed = ((state.x != self.mask_token_id) & region).sum(1)
        extra = torch.floor(self.config.remask_fraction * self.keep_masked[j] * committed).long()
        return torch.minimum(extra, masked.sum(1) - k).clamp_min(0)


@dataclass
class StepContext:
    """What one step has computed before deciding what to commit (all [b, l] unless noted)."""

    state: DenoisingState
    x: torch.Tensor  # the tokens before this step
    region: torch.Tensor  # the current block of each row
    masked: torch.Tensor  # masked positions of the region
    fill: torch.Tensor  # the positions sampled this step
    proposal: torch.Tensor  # x with a sampled token at every filled position
    processed: torch.Tensor  # [n, V] processed logits at the filled positions
    p: torch.Tensor  # [n] probability of each sampled token
    uniforms: torch.Tensor  # [b, 2, l] this step's uniforms (sampling, order)
    k: torch.Tensor  # [b] tokens the step plan commits
    at: Callable[[torch.Tensor], torch.Tensor]  # logits [m, V] at a subset of the needed positions


class CommitRule:
    """An unmasking rule: which of the step's sampled tokens are committed (and which committed ones re-open).
    ``commit`` returns the next tokens [b, l]."""

    def commit(self, sampler: "DenoisingSampler", step: StepContext) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def ranked(sampler: "DenoisingSampler", step: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, p) as [b, l] over the filled positions (-inf / 0 elsewhere): the strategy's order."""
        x = step.x
        score = torch.full(x.shape, _NEG_INF, device=x.device)
        if sampler.config.strategy == "left-to-right":  # the order is the position, leftmost first
            columns = torch.arange(x.shape[1], device=x.device, dtype=score.dtype).expand(x.shape)
            score[step.fill] = -columns[step.fill]
        else:
            score[step.fill] = sampler.scores(step.processed, step.p, step.uniforms[:, 1][step.fill])
        p_full = torch.zeros(x.shape, device=x.device)
        p_full[step.fill] = step.p
        return score, p_full


class RemaskRandom(CommitRule):
    """The original sampler: fill every masked position, then mask a random subset of the region again."""

    def commit(self, sampler, step):
        keep_masked = sampler._target_masked(step.state, step.region)  # [b]
        rank = _rank_descending(step.uniforms[:, 1].float().masked_fill(~step.region, -1.0))  # random order
        remask = step.region & (rank < keep_masked[:, None])
        return step.proposal.masked_fill(remask, sampler.mask_token_id)


class Scheduled(CommitRule):
    """The step plan's k best by the strategy's score; with ``remask_fraction`` (ReMDM) also re-open the least
    likely committed tokens of the block."""

    def commit(self, sampler, step):
        score, _ = self.ranked(sampler, step)
        x, mask_id = step.x, sampler.mask_token_id
        extra = sampler._remask_count(step.state, step.k, step.masked, step.region)  # [b] tokens to re-open
        commit = step.masked & (_rank_descending(score) < (step.k + extra)[:, None])
        if bool(extra.any()):
            older = (x != mask_id) & step.region  # committed before this step
            log_p = torch.full(x.shape, _NEG_INF, device=x.device)
            log_p[older] = step.at(older).float().log_softmax(-1).gather(-1, x[older][:, None]).squeeze(-1)
            worst = _rank_descending((-log_p).masked_fill(~older, _NEG_INF))  # least likely first
            x = x.masked_fill(older & (worst < extra[:, None]), mask_id)
        return torch.where(commit, step.proposal, x)


class Threshold(CommitRule):
    """Every token at least ``confidence_threshold`` likely, and the best one (steps become adaptive). With the
    ``left-to-right`` order: the leftmost masked token, and each next one while it is that likely and not the
    same token as the one before it — a run from the left. Two neighbours sampled in one call never saw each
    other; the same word twice ("the the") is the commonest error of committing them together, and the next call
    decides the second one knowing the first."""

    def commit(self, sampler, step):
        score, p_full = self.ranked(sampler, step)
        rank = _rank_descending(score)  # 0 = the best (with left-to-right: the leftmost masked position)
        sure = p_full >= sampler.config.confidence_threshold
        if sampler.config.strategy == "left-to-right":
            order = rank.argsort(dim=1)  # [b, l] positions in commit order
            tokens = step.proposal.gather(1, order)
            repeated = torch.zeros_like(sure)
            repeated[:, 1:] = tokens[:, 1:] == tokens[:, :-1]
            run = ((sure.gather(1, order) & ~repeated) | (torch.arange(rank.shape[1], device=rank.device) == 0)).long()
            keep = run.cumprod(1).bool().gather(1, rank)  # [b, l] in the run from the left
            commit = step.masked & keep
        else:
            commit = step.masked & (sure | (rank == 0))
        return torch.where(commit, step.proposal, step.x)


class EntropyBounded(CommitRule):
    """EB-sampler: the longest prefix of the order whose entropy budget stays within ``eb_gamma`` (and, with a
    threshold, every token above it)."""

    def commit(self, sampler, step):
        score, p_full = self.ranked(sampler, step)
        cfg, x = sampler.config, step.x
        entropy = torch.zeros(x.shape, device=x.device)
        entropy[step.fill] = -_neg_entropy(step.processed)
        commit = step.masked & entropy_bounded(score, entropy, step.masked, cfg.eb_gamma)
        if cfg.confidence_threshold is not None:
            commit |= step.masked & (p_full >= cfg.confidence_threshold)
        return torch.where(commit, step.proposal, x)


def commit_rule(config: SamplerConfig) -> CommitRule:
    """The unmasking rule a configuration asks for (the strategy names the order; these rules the commit)."""
    if config.strategy == "remask-random":
        return RemaskRandom()
    if config.strategy == "eb":
        return EntropyBounded()
    if config.confidence_threshold is not None:
        return Threshold()
    return Scheduled()


def continuation(editable: torch.Tensor) -> torch.Tensor:
    """[b, l] bool: each row's last editable span (after its last fixed token before the end), the part of
    a template that continues the text and may stop early; earlier infill spans have a fixed length."""
    positions = torch.arange(editable.shape[1], device=editable.device)  # [l]
    last_editable = torch.where(editable, positions, -1).max(1).values  # [b]
    fixed_before = ~editable & (positions < last_editable[:, None])  # [b, l]
    last_fixed = torch.where(fixed_before, positions, -1).max(1).values  # [b]
    return editable & (positions > last_fixed[:, None])


def entropy_bounded(score: torch.Tensor, entropy: torch.Tensor, masked: torch.Tensor, gamma: float) -> torch.Tensor:
    """[b, l] bool: EB-sampler's set. Positions taken in ``score`` order (best first); the longest prefix
    whose entropy sum minus its largest entropy is <= ``gamma`` (at least one per row with a mask).
    The sum minus the max never falls as the prefix grows, so the set is a prefix of the order."""
    order = score.masked_fill(~masked, _NEG_INF).argsort(dim=1, descending=True, stable=True)  # [b, l]
    e = entropy.gather(1, order).masked_fill(~masked.gather(1, order), 0.0).clamp_min(0)  # [b, l] in that order
    within = (e.cumsum(1) - e.cummax(1).values <= gamma) & masked.gather(1, order)  # [b, l] a prefix
    count = within.sum(1).clamp_min(1)  # [b]
    return order.argsort(dim=1) < count[:, None]


def _neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    return (logp.exp() * logp).nan_to_num().sum(-1)  # [n] = -entropy (nats)


def _margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.softmax(-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


# The unmasking order of each carry-over strategy: (processed logits [n, V], p of the sampled token [n],
# uniform noise [n]) -> score [n], higher first. "eb" orders like "entropy" and then bounds the set size.
SCORES = {
    "confidence": lambda logits, p, noise: p,
    "margin": lambda logits, p, noise: _margin(logits),
    "entropy": lambda logits, p, noise: _neg_entropy(logits),
    "eb": lambda logits, p, noise: _neg_entropy(logits),
    "random": lambda logits, p, noise: noise.float(),
    "left-to-right": lambda logits, p, noise: torch.zeros_like(p),  # ranked by position in CommitRule.ranked
}


def _rank_descending(score: torch.Tensor) -> torch.Tensor:
    """[b, l] rank of each entry within its row, 0 = largest (ties broken by position)."""
    order = score.argsort(dim=1, descending=True, stable=True)
    return order.argsort(dim=1)
