"""Few-step distillation by SDTT (Self-Distillation Through Time, Deschenaux & Gulcehre, arXiv 2410.21035).

A denoiser that needs N sampler steps for good text is taught to take N/2: the student starts as a copy of the
teacher; for each example the frozen teacher takes **two** steps of the N-step plan from a state x_t, the
student makes **one** forward pass on the same x_t, and the loss is the divergence between the student's
distribution and the teacher's at the positions the student's step fills. Every ``steps_per_round`` steps a
round ends: the student (its EMA, when one is kept) becomes the teacher and N halves (32 -> 16 -> 8), so after
R rounds one step does the work of 2^R. The ``distill`` command (distill_cli.py) runs it.

**Where x_t comes from** (``start_states`` + ``teacher_run``): from the generation the student will run, not
from random masks. The sampler used is the project's own (``DenoisingSampler``, with the checkpoint's saved
generation settings: block length, strategy, schedule, sampling), and under carry-over strategies it leaves
the *hard* positions masked — a state of a confidence-ordered sampler is not a random mask. Each example row
(a "chain") is a training block whose first ``prompt_length`` tokens are the prompt; a block index b is drawn
per row; the blocks before b keep the real text (teacher-forced: the committed context of a block sampler is
text, and drawing it from data instead of sampling it saves b x P teacher calls per row), block b and later
are masked, and the teacher's sampler runs through block b's P steps, all rows in lock-step (each row starts
at the start of its own block, so one step index serves every row; vectorised over the batch). Every state
the sampler visits at an even step 2j (where the N/2-step student takes its step j) is an x_t, and the
teacher's steps 2j and 2j+1 from it are its targets — the chain *is* the two-step rollouts, so each example
costs two teacher calls, as in SDTT. A batch of B examples takes ceil(B / (P/2)) chains (the rest of the data
batch is not used: the data only supplies prompts and committed context). Blocks after the first
end-of-text are not drawn as b: generation stops there.

**Targets** (``distillation_batch``): the teacher's raw log-softmax over the whole vocabulary (before the
suppression, top-k, temperature and repetition penalty the sampler applies to *draw*: a truncated target
would make a KL infinite). A position's target is the teacher's distribution at the step where it was
committed: committed at the first of the two steps and still committed after the second -> the first step's;
committed at the second step, or still masked after both -> the second step's (SDTT's rule). Under
confidence-ordered unmasking this matters: the first step commits the positions the teacher was sure of, and
the second step's distributions at the others are conditioned on them, which is what one student step must
anticipate. A position the second step did not read (re-masked by ``remask-random`` after the first step
committed it) keeps the first step's.

**Loss positions**: the masked positions of x_t that the student's step reads (``needed_positions``: the
current block). SDTT takes every masked position; with blocks the later blocks are masked too but no step of
this block reads them, so their targets would teach nothing the sampler uses. Divergences: reverse KL
KL(student || teacher) (SDTT's default, mode-seeking), forward KL, total variation; the mean over positions.

**Rounds** (``DistillTrainer``): at a round's end the *judged* model — the EMA of the student's weights when
one is kept, else the student — is evaluated (held-out divergence, NELBO), sampled at the halved step count by
the quality gate, and, if kept, copied into the teacher. (SDTT's default copies the raw student and evaluates
the EMA; here the model that was judged is the one kept and taught from, so nothing unjudged is kept.) A round
that fails the gate stops the run; the teacher, i.e. the previous round's model, is the result. Every round's judged
model, kept or not, is also saved as ``round-N/`` in the output dir (sampling at its step count).

The step counts assume the layout of the examples: ``max_length`` tokens, the teacher's protected prefix as
the prompt, so a fixed number of blocks; a `generate` prompt much longer or shorter can change the number of
blocks (the sampler then notes that the steps do not divide).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

from textdiffusion.config import SamplerConfig
from textdiffusion.core.denoiser import masked_logits
from textdiffusion.core.evaluation import nelbo
from textdiffusion.core.sampler import DenoisingSampler, DenoisingState
from textdiffusion.errors import UsageError
from textdiffusion.models.quality import diffusion_continuations, quality_row
from textdiffusion.pipelines.generation import DiffusionGenerator
from textdiffusion.pipelines.trainers import _ProjectTrainer

DIVERGENCES = ("reverse-kl", "forward-kl", "tvd")
STATE_NAME = "distill_state.json"
TEACHER_WEIGHTS = "teacher.safetensors"
EMA_WEIGHTS = "ema.safetensors"
ROUNDS_CSV = "distill_rounds.csv"


# -- the divergence ----------------------------------------------------------------------------------
def divergence(student_logits: torch.Tensor, target_log_probs: torch.Tensor, kind: str = "reverse-kl") -> torch.Tensor:
    """[n] divergence per position between the student's logits [n, V] and the teacher's log-probabilities [n, V],
    in float32. ``reverse-kl``: KL(student || teacher); ``forward-kl``: KL(teacher || student); ``tvd``:
    half the L1 distance of the probabilities."""
    if kind not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {kind!r}.")
    s = student_logits.float().log_softmax(-1)  # [n, V]
    t = target_log_probs.float()  # [n, V]
    if kind == "reverse-kl":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "forward-kl":
        return (t.exp() * (t - s)).sum(-1)
    return 0.5 * (s.exp() - t.exp()).abs().sum(-1)


# -- the step plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The template of a distillation example, as `generate` builds one: ``[cls]`` + prompt (``prompt_length``
    tokens with the cls), masks up to the block's closing ``[sep]``."""

    max_length: int
    prompt_length: int
    block_length: Optional[int]

    @property
    def editable(self) -> int:
        return self.max_length - self.prompt_length - 1

    @property
    def span(self) -> int:
        return min(self.editable, self.block_length or self.editable)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.editable / self.span)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of prompt text in a `generate` prompt laid out as these examples (the cls is position 0)."""
        return max(1, self.prompt_length - 1)

    @property
    def new_tokens(self) -> int:
        """Tokens such a prompt's continuation fills: up to the closing [sep]."""
        return self.max_length - 2 - self.prompt_tokens

    @classmethod
    def of(cls, config, sampler_config: SamplerConfig, max_length: int | None = None) -> "Layout":
        """The layout of a teacher (its DiffusionConfig): its protected prefix as the prompt, ``max_length`` tokens
        (its training length by default), the blocks of ``sampler_config``."""
        return cls(max_length or config.max_length, max(1, config.prefix_length), sampler_config.block_length)


def check_step_plan(start_steps: int, rounds: int, layout: Layout) -> None:
    """Refuse a step count the rounds cannot halve exactly: every round's count must split evenly over the
    blocks (the sampler gives each block N // blocks steps), and the teacher's per-block count must halve
    ``rounds`` times and not exceed the block (the sampler would clamp it)."""
    blocks, span = layout.num_blocks, layout.span
    unit = blocks * 2 ** rounds
    where = (f"{layout.editable} generated tokens in {blocks} block(s) of {span} (--max-length {layout.max_length}, "
             f"block_length {layout.block_length})")
    if start_steps % unit:
        raise UsageError(f"--start-steps {start_steps} cannot be halved {rounds} time(s) over {where}: it must be a "
                         f"multiple of {blocks} x 2^{rounds} = {unit}, e.g. {unit * max(1, round(start_steps / unit))}.")
    if start_steps // blocks > span:
        raise UsageError(f"--start-steps {start_steps} gives {start_steps // blocks} steps per block for {where}: more "
                         f"steps than positions (at most {span * blocks}).")


@dataclass
class DistillPlan:
    """How the teacher's sampler runs: the generation settings (``steps`` is set per round), the token ids
    it needs and the layout of an example."""

    sampler_config: SamplerConfig
    layout: Layout
    mask_token_id: int
    pad_token_id: int
    eos_token_id: Optional[int]  # end-of-text ends a continuation, as in `generate`
    suppress_ids: tuple = ()  # never drawn (pad, cls), as DiffusionGenerator.suppress_ids

    @classmethod
    def of(cls, tokenizer, sampler_config: SamplerConfig, layout: Layout) -> "DistillPlan":
        """The plan for a teacher's tokenizer, with `generate`'s fallbacks for the ids (DiffusionGenerator's)."""
        cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
        return cls(sampler_config, layout, tokenizer.mask_token_id, pad, sep, tuple(i for i in (pad, cls_id) if i is not None))

    def sampler(self, steps: int, editable: torch.Tensor) -> DenoisingSampler:
        config = dataclasses.replace(self.sampler_config, steps=steps)
        sampler = DenoisingSampler(config, self.mask_token_id, self.suppress_ids, eos_token_id=self.eos_token_id)
        sampler.set_timesteps(steps, editable)
        return sampler


def start_states(blocks: torch.Tensor, plan: DistillPlan, steps: int, g: torch.Generator):
    """(x [c, l], editable [c, l], attention [c, l], sampler): each row masked from a random block b on, the
    blocks before it kept as the real text; b is never after the block of the row's first end-of-text."""
    c, length = blocks.shape
    device = blocks.device
    if length != plan.layout.max_length:
        raise ValueError(f"blocks of {length} tokens, but the layout is {plan.layout.max_length}")
    positions = torch.arange(length, device=device)  # [l]
    editable = (positions >= plan.layout.prompt_length) & (positions < length - 1)  # [l]
    editable = editable[None, :] & (blocks != plan.pad_token_id)  # [c, l]
    sampler = plan.sampler(steps, editable)
    block = sampler.blocks(editable)  # [c, l], -1 outside
    last = block.max(1).values  # [c]
    if plan.eos_token_id is not None:
        eos = editable & (blocks == plan.eos_token_id)
        first_eos = torch.where(eos, block, torch.iinfo(block.dtype).max).min(1).values  # [c]
        last = torch.minimum(last, first_eos)
    u = torch.rand(c, generator=g, dtype=torch.float64).to(device)  # [c]
    current = (u * (last + 1).double()).floor().long().clamp_max(last)  # [c] uniform over 0..last
    masked = editable & (block >= current[:, None])  # [c, l]
    x = blocks.masked_fill(masked, plan.mask_token_id)
    attention = (blocks != plan.pad_token_id).long()
    return x, editable, attention, sampler


@dataclass
class TeacherRun:
    """The teacher's sampler run through one block: the states and the distributions it read."""

    states: torch.Tensor  # [P+1, c, l] tokens before each step, and after the last
    read: torch.Tensor  # [P, c, l] row of ``log_probs`` holding step i's distribution at a position, -1 where none
    log_probs: torch.Tensor  # [n, V] float32 raw log-softmax over the vocabulary, step by step in row-major order


@torch.no_grad()
def teacher_run(teacher, sampler: DenoisingSampler, x: torch.Tensor, editable: torch.Tensor, attention: torch.Tensor,
                generators: list[torch.Generator]) -> TeacherRun:
    """Run ``sampler`` for one block's steps (``sampler.steps_per_block``) from ``x`` with the teacher's logits,
    keeping every state and the raw log-softmax of every position it read."""
    state = DenoisingState(x=x, editable=editable, generators=generators)
    states, reads, log_probs, offset = [x], [], [], 0
    for _ in range(sampler.steps_per_block):
        needed = sampler.needed_positions(state)  # [c, l]
        logits = masked_logits(teacher, state.x, attention, needed)  # [n_i, V]
        read = torch.full(x.shape, -1, dtype=torch.long, device=x.device)  # [c, l]
        read[needed] = torch.arange(offset, offset + logits.shape[0], device=x.device)
        offset += logits.shape[0]
        log_probs.append(logits.float().log_softmax(-1))
        reads.append(read)
        state = sampler.step(logits, state)
        states.append(state.x)
    return TeacherRun(torch.stack(states), torch.stack(reads), torch.cat(log_probs))


@dataclass
class DistillBatch:
    """What the student sees and must match."""

    x: torch.Tensor  # [m, l] the states x_t
    attention: torch.Tensor  # [m, l]
    positions: torch.Tensor  # [m, l] bool: masked positions the student's step reads (the loss positions)
    targets: torch.Tensor  # [n, V] the teacher's log-probabilities there, row-major


def distillation_batch(run: TeacherRun, attention: torch.Tensor, mask_token_id: int, rows: int | None = None,
                       g: torch.Generator | None = None) -> DistillBatch:
    """Examples from a teacher run: the state before every even step 2j (the student's step j), with the
    targets of the two teacher steps from it (module docstring); ``rows`` of them drawn at random, or all."""
    steps, chains = run.read.shape[0], run.read.shape[1]
    device = run.states.device
    even = torch.arange(0, steps - 1, 2, device=device)  # [S] the student's step boundaries
    chain = torch.arange(chains, device=device).repeat_interleave(len(even))  # [c*S]
    k = even.repeat(chains)  # [c*S]
    if rows is not None and rows < len(k):
        pick = torch.randperm(len(k), generator=g)[:rows].to(device)  # [rows]
        chain, k = chain[pick], k[pick]
    x = run.states[k, chain]  # [m, l]
    positions = (run.read[k, chain] >= 0) & (x == mask_token_id)  # [m, l]
    kept_first = (run.states[k + 1, chain] != mask_token_id) & (run.states[k + 2, chain] != mask_token_id)  # [m, l]
    second = run.read[k + 1, chain]  # [m, l]
    source = torch.where(kept_first | (second < 0), run.read[k, chain], second)[positions]  # [n]
    return DistillBatch(x, attention[chain], positions, run.log_probs[source])


def make_batch(teacher, blocks: torch.Tensor, plan: DistillPlan, teacher_steps: int, rows: int | None,
               g: torch.Generator) -> DistillBatch:
    """``rows`` distillation examples (all a run gives with ``rows=None``) from data ``blocks`` [c, l]: the
    chains, the teacher's run through them and the examples drawn from it."""
    per_chain = max(1, teacher_steps // plan.layout.num_blocks // 2)  # examples a chain gives
    chains = len(blocks) if rows is None else min(len(blocks), -(-rows // per_chain))
    x, editable, attention, sampler = start_states(blocks[:chains], plan, teacher_steps, g)
    seeds = torch.randint(2 ** 62, (chains,), generator=g).tolist()
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # one per row, as in generation
    run = teacher_run(teacher, sampler, x, editable, attention, generators)
    return distillation_batch(run, attention, plan.mask_token_id, rows, g)


def distill_loss(student, batch: DistillBatch, kind: str) -> torch.Tensor:
    """Mean divergence over the loss positions of the student's one forward pass on the states."""
    if not bool(batch.positions.any()):  # nothing to fill (every chain ended early): a zero with a graph
        return sum(p.sum() for p in student.parameters() if p.requires_grad) * 0.0
    logits = masked_logits(student, batch.x, batch.attention, batch.positions)  # [n, V]
    return divergence(logits, batch.targets, kind).mean()


@torch.no_grad()
def held_out_divergence(student, teacher, blocks: torch.Tensor, plan: DistillPlan, teacher_steps: int,
                        kind: str = "reverse-kl", seed: int = 1234, chains: int = 16) -> float:
    """The mean divergence between the student's one step and the teacher's two, on every example that the
    chains of ``blocks`` give, with fixed randomness: comparable across checkpoints and rounds."""
    was_training = student.training
    student.eval()
    device = next(teacher.parameters()).device
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(blocks), chains):
        batch = make_batch(teacher, blocks[start:start + chains].to(device), plan, teacher_steps, None, g)
        if bool(batch.positions.any()):
            logits = masked_logits(student, batch.x, batch.attention, batch.positions)
            total += float(divergence(logits, batch.targets, kind).double().sum())
            count += int(batch.positions.sum())
    student.train(was_training)
    return total / max(count, 1)


# -- the run's state ----------------------------------------------------------------------------------
class EMA:
    """An exponential moving average of a model's weights, as a model (evaluated and sampled from)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        mine, theirs = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)


@dataclass
class RoundState:
    """Where the distillation is; saved in every checkpoint (``distill_state.json``), so --resume mid-round
    continues with the round's teacher and step count."""

    index: int = 1  # the round being trained (rounds + 1 once every round is done)
    teacher_steps: int = 0  # the teacher's step count this round; the student learns to take half
    stopped: bool = False  # a round failed the quality gate: the previous round's model is the result
    loss_sum: float = 0.0  # this round's training divergence so far
    loss_count: int = 0
    start_divergence: Optional[float] = None  # held-out divergence at the round's start
    reference: Optional[dict] = None  # quality of the original teacher at --start-steps (the gate's bar)
    history: list = field(default_factory=list)  # one dict per finished round

    def save(self, directory: Path) -> None:
        (directory / STATE_NAME).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "RoundState":
        values = json.loads((directory / STATE_NAME).read_text())
        return cls(**{k: v for k, v in values.items() if k in {f.name for f in fields(cls)}})


ROUND_COLUMNS = ("step", "round", "teacher_steps", "student_steps", "train_divergence", "held_out_start",
                 "held_out_end", "nelbo", "gen_ppl", "distinct2", "undistilled_gen_ppl", "undistilled_distinct2",
                 "kept")


# -- the quality gate ---------------------------------------------------------------------------------
class QualityGate:
    """The student's samples at its new step count, judged as `quality.py` judges generators: gen PPL under a
    separate causal LM beside distinct-2 (a low gen PPL alone can be repetition). A round is kept when both
    stay within ``tolerance`` (relative) of the original teacher's at --start-steps: gen PPL <= ref x (1 +
    tolerance) and distinct-2 >= ref x (1 - tolerance). The prompts are real validation text laid out as the
    distillation's examples are (same prompt length, same continuation length, so the same blocks)."""

    def __init__(self, tokenizer, config, sampler_config: SamplerConfig, prompts, new_tokens: int, scorer,
                 tolerance: float, device):
        self.tokenizer, self.config, self.sampler_config = tokenizer, config, sampler_config
        self.prompts, self.new_tokens, self.scorer = prompts, new_tokens, scorer
        self.tolerance, self.device = tolerance, device

    def measure(self, model, steps: int) -> dict:
        """A quality row (gen PPL, distinct-2, ...) of ``model`` (a Hugging Face masked LM) at ``steps`` steps."""
        was_training = model.training
        try:
            generator = DiffusionGenerator(model, self.tokenizer, self.config, self.device)
            settings = {f.name: getattr(self.sampler_config, f.name) for f in fields(SamplerConfig)}
            settings["steps"] = steps
            out = diffusion_continuations(generator, self.prompts, self.new_tokens, seed=0, **settings)
            return quality_row(f"{steps} steps", self.prompts, out.new_ids, self.tokenizer, self.scorer, out.texts, out.nfe)
        finally:
            model.train(was_training)

    def holds(self, row: dict, reference: dict) -> bool:
        return (row["gen_ppl"] <= reference["gen_ppl"] * (1 + self.tolerance)
                and row["distinct-2"] >= reference["distinct-2"] * (1 - self.tolerance))


# -- the Trainer --------------------------------------------------------------------------------------
def stack_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The data collator: blocks as they are (the distillation masks them itself)."""
    return {"input_ids": torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])}


class _RoundCallback(TrainerCallback):
    """After each optimiser step: the EMA, and at a round's end the round's evaluation and switch."""

    def __init__(self, trainer: "DistillTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        return self.trainer.after_step(control)


class DistillTrainer(_ProjectTrainer):
    """The project's Trainer (crash-safe checkpoints, --resume, logs) with the SDTT loss and its rounds.

    ``model`` is the student (a denoiser wrapper, as `train` trains); ``teacher`` a denoiser around a copy.
    The teacher, the EMA and the ``RoundState`` travel with the optimiser's state: written into every
    checkpoint and read back on --resume at the same points (``_save/_load_optimizer_and_scheduler``).
    """

    def __init__(self, *args, teacher, plan: DistillPlan, rounds: int, steps_per_round: int, start_steps: int,
                 divergence_kind: str = "reverse-kl", ema_decay: float = 0.0, gate: QualityGate | None = None,
                 wrap: Callable = lambda model: model, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is already a mean
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.plan, self.rounds, self.steps_per_round = plan, rounds, steps_per_round
        self.divergence_kind, self.gate, self.wrap = divergence_kind, gate, wrap
        self.ema = EMA(self.student_model(), ema_decay) if ema_decay else None
        self.round = RoundState(teacher_steps=start_steps)
        self._sync_config()
        self._calls = (-1, 0)  # (step, loss calls in it): the seed of each call's randomness
        self.add_callback(_RoundCallback(self))

    # -- models ------------------------------------------------------------------------------------
    def student_model(self) -> torch.nn.Module:
        """The Hugging Face model being trained (inside the denoiser wrapper, outside DDP)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False).model

    def judged_model(self) -> torch.nn.Module:
        """The model evaluated, sampled from and kept at a round's end: the EMA, or the student without one."""
        return self.ema.model if self.ema is not None else self.student_model()

    @property
    def active(self) -> bool:
        """True while a round is being trained (not after the last one, nor after a failed gate)."""
        return self.round.index <= self.rounds and not self.round.stopped

    def _sync_config(self) -> None:
        """Checkpoints carry the generation settings of the student in them: the distilled settings, at the
        step count it is learning (or has learnt, once the rounds are over)."""
        steps = self.round.teacher_steps // 2 if self.active else self.round.teacher_steps
        self.diffusion_config = dataclasses.replace(
            self.diffusion_config, generation=dataclasses.replace(self.plan.sampler_config, steps=steps))

    # -- the loss -----------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        """This loss call's randomness: a function of (seed, rank, step, call within the step) only, so a
        resumed run draws what the uninterrupted run drew."""
        step = self.state.global_step
        calls = self._calls[1] + 1 if self._calls[0] == step else 1
        self._calls = (step, calls)
        seed = ((self.args.seed * 1_000_003 + self.args.process_index) * 1_000_003 + step) * 64 + calls
        return torch.Generator().manual_seed(seed % 2 ** 63)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        blocks = inputs["input_ids"]  # [b, l]
        with torch.no_grad(), self.accelerator.autocast():
            batch = make_batch(self.teacher, blocks, self.plan, self.round.teacher_steps, len(blocks), self._generator())
        loss = distill_loss(model, batch, self.divergence_kind)
        self.round.loss_sum += float(loss.detach())
        self.round.loss_count += 1
        return (loss, None) if return_outputs else loss

    # -- evaluation ---------------------------------------------------------------------------------
    def held_out(self, steps: int | None = None) -> float:
        """Held-out divergence of the judged model's one step against the teacher's two at ``steps``."""
        return held_out_divergence(self.wrap(self.judged_model()), self.teacher, self.level_eval["blocks"], self.plan,
                                   steps or self.round.teacher_steps, self.divergence_kind)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The held-out divergence and the NELBO of the judged model; the NELBO goes to validation_curve.csv."""
        cfg = self.level_eval
        judged = self.wrap(self.judged_model())
        self.last_divergence = self.held_out()
        self.last_bound = nelbo(judged, cfg["blocks"], cfg["collator"], samples_per_block=2,
                                batch_size=self.args.per_device_eval_batch_size)
        metrics = {f"{metric_key_prefix}_divergence": round(self.last_divergence, 5),
                   f"{metric_key_prefix}_teacher_steps": self.round.teacher_steps}
        return self._finish_evaluation(metrics, self.last_bound, "nelbo")

    def begin(self) -> None:
        """Before the first step of a new run: the held-out divergence of round 1 and the gate's bar."""
        self.round.start_divergence = self.held_out()
        if self.gate is not None:
            self.round.reference = self.gate.measure(self.teacher.model, self.round.teacher_steps)
        if self.is_world_process_zero():
            line = f"\nround 1: the teacher takes {self.round.teacher_steps} steps, the student learns {self.round.teacher_steps // 2}; " \
                   f"held-out divergence at the start {self.round.start_divergence:.4f}"
            if self.round.reference:
                line += (f"; the gate's bar (teacher at {self.round.teacher_steps} steps): gen PPL "
                         f"{self.round.reference['gen_ppl']:.1f}, distinct-2 {self.round.reference['distinct-2']:.3f}")
            print(line, flush=True)

    # -- rounds -------------------------------------------------------------------------------------
    def after_step(self, control):
        if self.ema is not None:
            self.ema.update(self.student_model())
        step = self.state.global_step
        if step % self.steps_per_round == 0 and self.active:
            self.end_round()
            control.should_save = True  # the round's switch is in the checkpoint: --resume continues from it
            control.should_evaluate = False  # evaluated just now
            if self.round.stopped:
                control.should_training_stop = True
        return control

    def end_round(self) -> None:
        """Judge the round's student; keep it (it becomes the teacher, the step count halves) or stop."""
        r = self.round
        teacher_steps, student_steps = r.teacher_steps, r.teacher_steps // 2
        self.evaluate()
        row = {"step": self.state.global_step, "round": r.index, "teacher_steps": teacher_steps,
               "student_steps": student_steps, "train_divergence": r.loss_sum / max(r.loss_count, 1),
               "held_out_start": r.start_divergence, "held_out_end": self.last_divergence,
               "nelbo": self.last_bound.nats_per_token}
        kept, judged = True, self.judged_model()
        if self.gate is not None:
            quality = self.gate.measure(judged, student_steps)
            undistilled = self.gate.measure(self.teacher.model, student_steps)  # what halving alone would give
            kept = self.gate.holds(quality, r.reference)
            row.update(gen_ppl=quality["gen_ppl"], distinct2=quality["distinct-2"],
                       undistilled_gen_ppl=undistilled["gen_ppl"], undistilled_distinct2=undistilled["distinct-2"])
        row["kept"] = kept
        if self.is_world_process_zero():
            self.save_round_model(judged, student_steps, Path(self.level_eval["report_dir"]) / f"round-{r.index}")
        if kept:
            self.teacher.model.load_state_dict(judged.state_dict())
            r.teacher_steps = student_steps
        else:
            r.stopped = True
        r.history.append(row)
        r.index += 1
        r.loss_sum, r.loss_count = 0.0, 0
        self._sync_config()
        if self.active:
            r.start_divergence = self.held_out()  # the next round starts: student (judged) = teacher
        if self.is_world_process_zero():
            print(round_line(row, r.reference, self.gate is not None, self.rounds), flush=True)
            append_round_csv(Path(self.level_eval["report_dir"]) / ROUNDS_CSV, row)

    def save_round_model(self, model: torch.nn.Module, steps: int, folder: Path) -> None:
        """The round's judged model as a checkpoint of its own (``round-N/``, sampling with ``steps`` steps), kept or
        not: a round the gate refused can still be sampled, benchmarked or exported."""
        model.save_pretrained(folder)
        self.processing_class.save_pretrained(folder)
        dataclasses.replace(self.diffusion_config, max_length=self.plan.layout.max_length, generation=dataclasses.replace(
            self.plan.sampler_config, steps=steps)).save_pretrained(folder)

    # -- the state in checkpoints ---------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            from safetensors.torch import save_model

            folder = Path(output_dir)
            save_model(self.teacher.model, str(folder / TEACHER_WEIGHTS))
            if self.ema is not None:
                save_model(self.ema.model, str(folder / EMA_WEIGHTS))
            self.round.save(folder)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        from safetensors.torch import load_model

        folder = Path(checkpoint)
        if not (folder / STATE_NAME).exists():
            raise UsageError(f"--resume: {checkpoint} has no {STATE_NAME}: it is not a checkpoint of `distill`.")
        load_model(self.teacher.model, str(folder / TEACHER_WEIGHTS), device=str(self.args.device))
        if self.ema is not None:
            load_model(self.ema.model, str(folder / EMA_WEIGHTS), device=str(self.args.device))
        self.round = RoundState.load(folder)
        self._sync_config()


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def round_line(row: dict, reference: dict | None, gated: bool, rounds: int) -> str:
    """The per-round report: step counts, divergence, NELBO and the gate's verdict."""
    line = (f"\nround {row['round']}/{rounds} (step {row['step']}): {row['teacher_steps']} -> {row['student_steps']} steps; "
            f"divergence {row['train_divergence']:.4f} (training mean), held-out {_fmt(row['held_out_start'], '.4f')} -> "
            f"{row['held_out_end']:.4f}; validation NELBO {row['nelbo']:.4f} nats/token")
    if not gated:
        return line + "; quality gate off; kept"
    line += (f"; gen PPL {_fmt(row['gen_ppl'], '.1f')}, distinct-2 {_fmt(row['distinct2'], '.3f')} at "
             f"{row['student_steps']} steps (undistilled teacher there: {_fmt(row['undistilled_gen_ppl'], '.1f')}, "
             f"{_fmt(row['undistilled_distinct2'], '.3f')}; bar: {_fmt(reference['gen_ppl'], '.1f')}, "
             f"{_fmt(reference['distinct-2'], '.3f')})")
    return line + ("; kept" if row["kept"] else "; quality NOT held: stopping, the previous round's model is kept")


def append_round_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(",".join(ROUND_COLUMNS) + "\n")
        f.write(",".join("" if row.get(c) is None else str(row.get(c)) for c in ROUND_COLUMNS) + "\n")

