"""QUICKSTART.md cannot rot: its ```bash test blocks run here, in order, in a tmp folder, with fewer steps.

The rewrites below are the only changes to the commands; each must match, so a rewrite that silently stops applying
(because the quickstart changed) fails the test instead of running the full-size command.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "QUICKSTART.md"
SHRINK = [  # (pattern, replacement): CPU-test sizes for the commands' step counts
    (r"--max-steps \d+", "--max-steps 4"),
    (r"--eval-steps \d+", "--eval-steps 2"),
    (r"--steps \d+", "--steps 4"),
]


def blocks(info: str) -> list[str]:
    return re.findall(rf"^```{info}\n(.*?)^```", QUICKSTART.read_text(), flags=re.M | re.S)


def test_every_make_target_in_the_quickstart_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"\bmake ([\w-]+)", "\n".join(blocks("bash") + blocks("bash test"))))
    assert named and named <= targets


def test_the_quickstart_links_exist():
    for link in re.findall(r"\]\(([^)#:]+)\)", QUICKSTART.read_text()):
        assert (ROOT / link).exists(), link


@pytest.mark.slow
def test_quickstart_cpu_blocks_run(tmp_path, monkeypatch, capsys):
    """Each line runs in order in a tmp folder: `textdiffusion ...` through cli.main in this process (one
    torch import instead of six; the console script itself is tested in test_train.py), the rest in bash."""
    from textdiffusion.cli.main import main

    script = "\n".join(blocks("bash test"))
    for pattern, replacement in SHRINK:
        assert re.search(pattern, script), f"{pattern!r} no longer in QUICKSTART.md: update the test's rewrites"
        script = re.sub(pattern, replacement, script)
    for name in ("README.md", "QUICKSTART.md"):  # the files the quickstart reads from the clone
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines = [ln for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert sum(ln.startswith("textdiffusion ") for ln in lines) >= 6  # generate, infill, train, eval x2, animate
    stdout = ""
    for line in lines:
        if line.startswith("textdiffusion "):
            argv = shlex.split(line, comments=True)[1:]
            assert main(argv) == 0, (line, capsys.readouterr().err[-3000:])
            stdout += capsys.readouterr().out
        else:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", line], capture_output=True, text=True)
            assert r.returncode == 0, (line, r.stderr)
    assert (tmp_path / "runs" / "mine" / "model.safetensors").exists()
    assert stdout.count("NELBO (upper bound on NLL)") == 2  # both evaluations
    samples = re.findall(r"^\[sample \d+\] (.*)$", stdout, flags=re.M)
    assert any(s.startswith("The history of the river") for s in samples)
    assert any(s.startswith("To train a model") for s in samples)
    infilled = [s for s in samples if s.startswith("The ") and " was built in " in s]
    assert infilled and all("<mask" not in s for s in infilled)
