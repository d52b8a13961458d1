"""QUICKSTART.md cannot rot: its ```bash test blocks run here, in order, in a tmp folder, with fewer steps.

The rewrites below are the only changes; each must match, so a rewrite that silently stops applying
(because the quickstart changed) fails the test instead of running the full-size command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
def test_quickstart_cpu_blocks_run(tmp_path):
    script = "\n".join(blocks("bash test"))
    assert script.count("textdiffusion ") >= 6  # generate, infill, train, eval x2, animate
    for pattern, replacement in SHRINK:
        assert re.search(pattern, script), f"{pattern!r} no longer in QUICKSTART.md: update the test's rewrites"
        script = re.sub(pattern, replacement, script)
    for name in ("README.md", "QUICKSTART.md"):  # the files the quickstart reads from the clone
        (tmp_path / name).symlink_to(ROOT / name)
    prelude = 'set -euo pipefail\ntextdiffusion() { "$TD_PYTHON" -m textdiffusion "$@"; }\n'
    env = {**os.environ, "TD_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["bash", "-c", prelude + script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert (tmp_path / "runs" / "mine" / "model.safetensors").exists()
    assert r.stdout.count("NELBO (upper bound on NLL)") == 2  # both evaluations
    samples = re.findall(r"^\[sample \d+\] (.*)$", r.stdout, flags=re.M)
    assert any(s.startswith("The history of the river") for s in samples)
    assert any(s.startswith("To train a model") for s in samples)
    infilled = [s for s in samples if s.startswith("The ") and " was built in " in s]
    assert infilled and all("<mask" not in s for s in infilled)
