"""`generate --animate` paces its live view with --step-delay (one pause per shown step, none otherwise)."""

import re

import pytest

import textdiffusion.cli.generate as generate_cli
from textdiffusion.cli.main import main


def test_animate_pauses_step_delay_after_each_step(monkeypatch, capsys):
    pauses = []
    monkeypatch.setattr(generate_cli.time, "sleep", pauses.append)
    assert main(["generate", "--prefix", "The river", "--animate", "--step-delay", "0.05", "--steps", "4",
                 "--max-length", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    calls = int(re.search(r"(\d+) model calls \(NFE\)", out).group(1))
    assert pauses == [0.05] * calls and calls >= 1
    assert main(["generate", "--prefix", "The river", "--hide-steps", "--steps", "4", "--max-length", "16"]) == 0
    assert len(pauses) == calls  # no pacing without --animate


@pytest.mark.parametrize("value", ["-0.1"])
def test_step_delay_must_not_be_negative(value, capsys):
    assert main(["generate", "--animate", "--step-delay", value]) == 2
    assert f"--step-delay must be >= 0, got {float(value)}" in capsys.readouterr().err
