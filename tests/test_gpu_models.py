"""benchmarks/gpu_models.sh in its CPU mode: trains every ready model (shortened), evaluates, samples and exports them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mpnet_helpers import save_headless_mpnet

from textdiffusion.models import bundled

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_models_cpu_smoke_trains_evaluates_and_exports_every_model(tmp_path, wiki, small_jsonl):
    """Every stage in one run (one evaluation of the bundled wiki-small for all): wiki-small from its preset and a tiny
    MPNet by the GPU recipes (shortened); a tiny Llama adapted by the GPU recipe and exported with the measured
    generate defaults and its shift; the same Llama trained by the block recipe, exported as an adapter, evaluated
    (block NELBO) and compared with itself left to right by block_compare.py --quick; the new wiki-small distilled
    (one round of two steps, 8 -> 4), its rounds' verdicts kept, exported at its new step count and evaluated."""
    from test_adapt import save_tiny_causal

    from textdiffusion.config import DiffusionConfig
    from textdiffusion.models.loading import load_masked_lm

    mpnet = save_headless_mpnet(tmp_path / "tiny-mpnet", wiki.train[:200])
    llama = tmp_path / "tiny-llama"
    save_tiny_causal(llama, wiki.train[:200])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_MODELS_SMOKE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    models = "wiki-small,mpnet-wiki,smollm2-wiki,smollm2-bd,wiki-small-sdtt"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_models.sh"), "--out", str(out), "--models", models,
                           "--mpnet", str(mpnet), "--smollm2", str(llama), "--dataset", str(small_jsonl)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and [r["model"] for r in summary["models"]] == [
        "wiki-small-now", "wiki-small-new", "mpnet-wiki", "smollm2-wiki", "smollm2-bd", "wiki-small-sdtt"]
    for row in summary["models"]:
        assert row["bits_per_byte"] > 0 and row["nats_per_word"] > row["nats_per_token"]
    # the smoke runs its steps in one process: each step's output still lands in that step's own log
    assert "done: model" in (out / "wiki-gpu.train.log").read_text()
    assert "done: model" not in (out / "mpnet-wiki.eval.log").read_text()
    for name in ("wiki-small", "mpnet-wiki"):  # the exports load and carry their diffusion settings
        assert (out / "models" / name / "diffusion_config.json").exists()
        assert load_masked_lm(str(out / "models" / name))[1].missing_head_keys == []
    # the adaptation
    config = DiffusionConfig.from_pretrained(out / "models" / "smollm2-wiki")
    assert config.adapted_from_causal
    assert {k: getattr(config.generation, k) for k in bundled.BUILT["smollm2-wiki"].generation} == \
        bundled.BUILT["smollm2-wiki"].generation
    # the block adapter
    exported = out / "models" / "smollm2-bd"
    assert (exported / "adapter_model.safetensors").exists() and not (exported / "model.safetensors").exists()
    assert DiffusionConfig.from_pretrained(exported).block_size == 4
    assert "blocks of 4" in json.loads((out / "eval-smollm2-bd" / "eval.json").read_text())["nelbo"][0]["estimator"]
    assert "tokens/call" in (out / "block_compare" / "README.md").read_text()
    # the distillation
    rounds = (out / "wiki-small-sdtt.rounds.csv").read_text().splitlines()
    assert len(rounds) == 2 and rounds[1].split(",")[2:4] == ["8", "4"] and rounds[1].endswith("True")
    assert DiffusionConfig.from_pretrained(out / "models" / "wiki-small-sdtt").generation.steps == 4
    assert not (out / "runs").exists()


def test_gpu_models_flags(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_models.sh"), "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2 and "--cpu-smoke" in done.stderr
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_models.sh"), "--models", "wiki-small,gpt2"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "'gpt2' is not one of wiki-small, mpnet-wiki, smollm2-wiki, wiki-small-sdtt, smollm2-bd" in done.stderr


def test_export_needs_dest_for_a_name_that_is_not_bundled(capsys):
    assert bundled.main(["--run", "nowhere", "--name", "mpnet-wiki"]) == 2
    assert "--name must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("isolate", [pytest.param(True, marks=pytest.mark.slow), False])  # two processes: slow
def test_a_failed_step_names_itself_and_shows_its_log(tmp_path, isolate):
    """Both executors of gpu_models.py: a step's output goes to its log, and a failure stops the pipeline with
    the step's name and the end of its log (on a GPU each step is a process; the smoke runs them in one)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_models import StepFailed, Steps

    steps = Steps(isolate=isolate, device="cpu")
    steps.run("listing the commands", "textdiffusion", ["--help"], tmp_path / "help.log")
    assert "usage: textdiffusion COMMAND" in (tmp_path / "help.log").read_text()
    with pytest.raises(StepFailed, match=r"(?s)evaluating x failed; see .*bad\.log.*--bogus-flag"):
        steps.run("evaluating x", "textdiffusion", ["eval", "--bogus-flag", "3"], tmp_path / "bad.log")
