"""Crash safety: a run killed with SIGKILL and resumed ends exactly where the uninterrupted run ends; a
damaged last checkpoint is skipped with a warning; resuming a finished run changes nothing."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textdiffusion.cli.main import main

FAST = ["--preset", "micro", "--max-length", "64", "--batch-size", "8", "--eval-blocks", "16", "--logging-steps", "10",
        "--save-total-limit", "10"]


def command(docs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "textdiffusion", "train", "--dataset", str(docs), "--output-dir", str(out), *FAST, *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, small_jsonl):
    steps = ["--max-steps", "40", "--eval-steps", "10", "--time-sampling", "antithetic"]
    subprocess.run(command(small_jsonl, tmp_path / "ref", *steps), env=env(), check=True, capture_output=True)

    crash = tmp_path / "crash"
    proc = subprocess.Popen(command(small_jsonl, crash, *steps), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (crash / "checkpoint-20").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crash / "model.safetensors").exists()  # it really was cut off mid-run

    done = subprocess.run(command(small_jsonl, crash, *steps, "--resume"), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    assert digest(crash / "model.safetensors") == digest(tmp_path / "ref" / "model.safetensors")
    assert (crash / "per_level_loss.csv").read_text() == (tmp_path / "ref" / "per_level_loss.csv").read_text()
    assert (crash / "validation_curve.csv").read_text() == (tmp_path / "ref" / "validation_curve.csv").read_text()
    assert not list(crash.glob(".checkpoint-*"))  # no half-written save left behind


@pytest.mark.slow
def test_resume_with_gradient_accumulation_across_an_epoch_end_gives_the_same_weights(tmp_path, small_jsonl):
    """A step takes two batches, and the epoch's 27 batches end in a one-batch step (step 14): the resumed
    mask stream starts at the batch the uninterrupted run was at (29 before step 16), not at the step."""
    run = tmp_path / "run"
    base = ["train", "--dataset", str(small_jsonl), "--output-dir", str(run), *FAST, "--batch-size", "32",
            "--gradient_accumulation_steps", "2", "--max-steps", "20", "--eval-steps", "5"]
    assert main(base) == 0
    assert json.loads((run / "checkpoint-20" / "trainer_state.json").read_text())["epoch"] > 1  # it crossed one
    uninterrupted = digest(run / "checkpoint-20" / "model.safetensors")
    shutil.rmtree(run / "checkpoint-20")  # as if killed after checkpoint-15
    (run / "model.safetensors").unlink()
    assert main(base + ["--resume"]) == 0
    assert digest(run / "checkpoint-20" / "model.safetensors") == uninterrupted


def test_checkpoints_are_renamed_into_place_complete(tmp_path, small_jsonl):
    assert main(["train", "--dataset", str(small_jsonl), "--output-dir", str(tmp_path / "run"), *FAST,
                 "--max-steps", "10", "--eval-steps", "5"]) == 0
    for step in (5, 10):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        for name in ("model.safetensors", "trainer_state.json", "optimizer.pt", "diffusion_config.json"):
            assert (ckpt / name).is_file(), (ckpt, name)
        assert json.loads((ckpt / "trainer_state.json").read_text())["best_model_checkpoint"].endswith("checkpoint-10") \
            or step == 5
    assert not list((tmp_path / "run").glob(".checkpoint-*"))


def test_resume_skips_a_truncated_last_checkpoint(tmp_path, small_jsonl, capsys):
    run = tmp_path / "run"
    base = ["train", "--dataset", str(small_jsonl), "--output-dir", str(run), *FAST, "--eval-steps", "5"]
    assert main(base + ["--max-steps", "10"]) == 0
    weights = run / "checkpoint-10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a kill during the save, a full disk
    capsys.readouterr()
    assert main(base + ["--max-steps", "15", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"skipping {run / 'checkpoint-10'}" in out and "truncated" in out
    assert f"resuming from {run / 'checkpoint-5'}" in out
    assert json.loads((run / "checkpoint-15" / "trainer_state.json").read_text())["global_step"] == 15


def test_resuming_a_finished_run_changes_nothing(tmp_path, small_jsonl, capsys):
    run = tmp_path / "run"
    base = ["train", "--dataset", str(small_jsonl), "--output-dir", str(run), *FAST, "--max-steps", "10", "--eval-steps", "5"]
    assert main(base) == 0
    before = {p.name: digest(p) for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(base + ["--resume"]) == 0
    assert "already finished (10 of 10 steps)" in capsys.readouterr().out
    assert {p.name: digest(p) for p in run.iterdir() if p.is_file()} == before


def test_resume_with_no_readable_checkpoint_is_refused(tmp_path, small_jsonl, capsys):
    run = tmp_path / "run"
    base = ["train", "--dataset", str(small_jsonl), "--output-dir", str(run), *FAST, "--max-steps", "5", "--eval-steps", "5"]
    assert main(base) == 0
    (run / "checkpoint-5" / "model.safetensors").write_bytes(b"\0" * 10)
    assert main(base + ["--max-steps", "10", "--resume"]) == 2
    assert "no checkpoint in --output-dir" in capsys.readouterr().err
