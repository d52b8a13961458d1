"""Help that teaches (issue 33): every command's `--help` fits 80 lines — the flags a newcomer needs in named
groups, each flag once with its default, and one closing line pointing to `--help-all`, which lists every flag
(TrainingArguments' included) — and a misspelled flag on any command is one line naming the closest real flag."""

import pytest

from textdiffusion.cli.main import main
from textdiffusion.experiments.registry import EXPERIMENTS

COMMANDS = ["train", "distill", "generate", "train-guide", "eval", "classify", "serve", "fetch-model", "deploy"]


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[c, "--help"] for c in COMMANDS] + [["experiment", "--help"]] +
                         [["experiment", name, "--help"] for name in EXPERIMENTS] + [["deploy", "run", "--help"]])
def test_every_help_fits_80_lines(argv, capsys):
    if argv == ["deploy", "--help"] or argv == ["experiment", "--help"]:  # the verb lists print and return
        assert main(argv) == 0
        text = capsys.readouterr().out
    else:
        text = help_of(argv, capsys)
    assert len(text.splitlines()) <= 80, (argv, len(text.splitlines()))


@pytest.mark.parametrize("command, shown, hidden", [
    ("train", ["model:", "--model-name NAME", "--block-size N", "--batch-size N", "(default: 128)"],
     ["--adam-beta1", "--adam_beta1", "--top_k"]),
    ("distill", ["distillation:", "--teacher", "--rounds N", "--dataset"], ["--adam-beta1", "--complementary-masks"]),
    ("generate", ["denoising:", "--confidence-threshold X", "--top-k N", "(default: 50)"], ["--eb-gamma", "--top_k"]),
])
def test_help_shows_groups_and_help_all_shows_every_flag(command, shown, hidden, capsys):
    short = help_of([command, "--help"], capsys)
    for needle in shown:
        assert needle in short, needle
    for needle in hidden:
        assert needle not in short, needle
    last = short.strip().splitlines()[-1]
    assert last.endswith(f"textdiffusion {command} --help-all") and "more flags" in last
    everything = help_of([command, "--help-all"], capsys)
    assert all(h.replace("_", "-") in everything for h in hidden if h != "--top_k" or command != "train")
    assert len(everything.splitlines()) > len(short.splitlines())


def test_a_hidden_flag_still_works(tmp_path, capsys):
    assert main(["generate", "--checkpoint", "wiki-small", "--prefix", "The", "--max-length", "12", "--steps", "2",
                 "--eb-gamma", "0.5", "--hide-steps"]) == 0  # --eb-gamma is only in --help-all
    assert "The" in capsys.readouterr().out


def test_an_experiments_help_shows_its_own_flags_not_the_others(capsys):
    text = help_of(["experiment", "block-sizes", "--help"], capsys)
    assert "--block-sizes" in text and "--recipe" in text and "--label-fractions" not in text


@pytest.mark.parametrize("argv", [[c] for c in ["train", "distill", "generate", "train-guide", "eval", "classify",
                                                 "serve", "fetch-model"]]
                         + [["experiment", "steps"], ["deploy", "push", "host"], ["deploy", "run", "host"]])
def test_a_misspelled_flag_is_one_line_on_every_command(argv, capsys):
    assert main([*argv, "--bogus-flag", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bogus-flag" in err and "Traceback" not in err, err


def test_the_closest_flag_is_named(capsys):
    assert main(["train", "--max-step", "3"]) == 2
    assert "did you mean --max-steps" in capsys.readouterr().err
