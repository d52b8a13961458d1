"""The how-to pages cannot rot (issue 33): every ```bash and ```python example on docs/howto/*.md runs here, CPU-sized,
in one tmp folder, page after page (a later page uses an earlier one's runs) — unless the line before it says why
it cannot ("*Not run by the tests: ...*": the network, a GPU, an SSH host, a server that runs until stopped).

A `textdiffusion` line runs through cli.main in this process with its sizes shrunk (the rewrites below; each must
still match something, so a page that changes fails here instead of running a full-size command) and SmolLM2
replaced by a two-layer Llama laid out like it (the real one runs in the quickstart and demo tests); any other
line runs in bash; a Python block runs with exec.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOWTO = ROOT / "docs" / "howto"
# in the order they run: classify trains runs/austen-book, which steer uses; train writes runs/wiki-small (experiments)
PAGES = ["train", "evaluate", "generate", "classify", "steer", "adapt", "distill", "finetune", "experiments", "serve",
         "deploy"]
# "*Not run by the tests: why.*" or "*Run by tests/test_x.py: how.*" (the same command already runs there)
NOT_RUN = re.compile(r"^\*(Not run by the tests: .+|Run by (tests/\w+\.py)\b.*)\*$")
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", flags=re.M | re.S)
SHRINK = [(r"--max-steps \d+", "--max-steps 2"), (r"--steps-per-round \d+", "--steps-per-round 2"),
          (r"--steps \d+", "--steps 4"), (r"--num-samples \d+", "--num-samples 1"), (r"--limit \d+", "--limit 4"),
          (r"--particles \d+", "--particles 2"), (r"--rounds \d+", "--rounds 1"), (r"--start-steps \d+", "--start-steps 8"),
          (r"--attention-anneal-steps \d+", "--attention-anneal-steps 1")]
# flags added to every command of a kind (later flags win): seconds, not hours
EXTRA = {
    "train": ["--max-steps", "2", "--eval-steps", "2", "--eval-blocks", "2", "--batch-size", "2", "--max-length", "32",
              "--logging-steps", "2", "--overwrite"],
    "distill": ["--eval-blocks", "2", "--batch-size", "2", "--no-quality-gate", "--overwrite"],
    "train-guide": ["--steps", "4"],
    "eval": ["--eval-blocks", "2", "--samples-per-block", "1"],
    "generate": ["--max-length", "24", "--hide-steps"],
    "classify": [],
    "experiment": ["--num-prompts", "2", "--new-tokens", "8", "--scorer", "none", "--overwrite"],
}


def examples(page: str) -> list[tuple[str, str, bool]]:
    """(language, code, run?) of every example on a page."""
    text = (HOWTO / f"{page}.md").read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").splitlines()
        note = NOT_RUN.match(before[-1].strip()) if before else None
        if note and note.group(2):
            assert (ROOT / note.group(2)).is_file(), f"{page}.md: {note.group(2)} does not exist"
        found.append((match.group(1), match.group(2), note is None))
    return found


def test_every_page_is_listed_and_every_skipped_example_says_why():
    assert sorted(PAGES) == sorted(p.stem for p in HOWTO.glob("*.md"))
    runnable = "\n".join(code for page in PAGES for _, code, run in examples(page) if run)
    for pattern, _ in SHRINK:  # a rewrite that stops applying would let a full-size command run
        assert re.search(pattern, runnable), f"{pattern!r} matches no example any more: update SHRINK"
    for page in PAGES:
        for language, code, run in examples(page):
            if run and language == "bash":
                for line in _lines(code):
                    if not line.startswith(("textdiffusion ", "python ")):
                        pytest.fail(f"{page}.md runs {line!r}: only textdiffusion/python lines run here; say why not")


def _lines(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _shrink(argv: list[str], tiny_llama: str) -> list[str]:
    line = shlex.join(argv)
    for pattern, replacement in SHRINK:
        line = re.sub(pattern, replacement, line)
    argv = shlex.split(line)
    if argv[0] == "experiment" and argv[1] == "repeated-data":
        return argv + ["--quick"]
    if argv[0] == "train" and "smollm2" in line:  # SmolLM2's 135M weights: a two-layer Llama laid out like it
        argv += ["--model-name", tiny_llama]
    return argv + EXTRA.get(argv[0], [])


@pytest.mark.slow
def test_howto_examples_run(tmp_path, monkeypatch, capsys, wiki):
    from test_adapt import save_tiny_causal

    from textdiffusion.cli.main import main

    tiny_llama = tmp_path / "tiny-llama"
    save_tiny_causal(tiny_llama, wiki.train[:200])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    ran = 0
    for page in PAGES:
        for language, code, run in examples(page):
            if not run:
                continue
            if language == "python":
                exec(compile(code, f"docs/howto/{page}.md", "exec"), {})
                ran += 1
                continue
            for line in _lines(code):
                argv = shlex.split(line, comments=True)
                if argv[0] == "textdiffusion":
                    argv = _shrink(argv[1:], str(tiny_llama))
                    assert main(argv) == 0, (page, line, capsys.readouterr().err[-3000:])
                else:
                    r = subprocess.run(["bash", "-euo", "pipefail", "-c", line], capture_output=True, text=True)
                    assert r.returncode == 0, (page, line, r.stderr)
                ran += 1
    capsys.readouterr()
    assert ran >= 25
