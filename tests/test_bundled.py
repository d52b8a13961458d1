"""The bundled `wiki-small` model: it loads by name, matches its recipe, generates; and the demo runs."""

import json
from pathlib import Path

import pytest
import yaml

from textdiffusion.cli.main import main
from textdiffusion.models import bundled
from textdiffusion.pipelines.training_args import resolve_aliases

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_matches_its_recipes_and_size():
    """Two stages: recipes/wiki-small.yaml from scratch, then recipes/wiki-small-eos.yaml (end-of-text learned),
    whose run record ships with the model."""
    path = Path(bundled.resolve_checkpoint("wiki-small"))
    recipe = yaml.safe_load((ROOT / "recipes" / "wiki-small.yaml").read_text())
    stage2 = yaml.safe_load((ROOT / "recipes" / "wiki-small-eos.yaml").read_text())
    run_args = resolve_aliases(json.loads((path / "run_args.json").read_text()))  # older runs: older names
    for key, value in resolve_aliases(stage2).items():
        if key != "output_dir" and not (key == "precision" and value == "auto"):  # newer runs record what ran
            assert run_args[key] == value, key
    from textdiffusion.config import DiffusionConfig

    saved = DiffusionConfig.from_pretrained(path)
    assert saved.corruption.learn_eos and saved.corruption.doc_end_fraction == stage2["doc_end_fraction"]
    config = json.loads((path / "config.json").read_text())
    from textdiffusion.models.presets import PRESETS

    preset = PRESETS[recipe["preset"]]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (preset.hidden_size, preset.num_hidden_layers)
    from transformers import AutoTokenizer

    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(path)) <= recipe["vocab_size"]
    assert (path / "model.safetensors").stat().st_size < bundled.MAX_BUNDLED_MB * 2**20
    assert (path / "README.md").read_text().count("textdiffusion eval") >= 1  # the model card


def test_four_step_generation_from_the_bundled_model(tmp_path):
    from textdiffusion.pipelines.generation import DiffusionGenerator

    gen = DiffusionGenerator.from_pretrained("wiki-small", device="cpu")
    out = gen.generate(["The river"] * 2, max_length=32, steps=4, seed=0)
    assert out.nfe == 4
    for text, row in zip(out.texts, out.token_ids):
        assert text.startswith("The river") and len(text) > len("The river") + 10
        assert int((row == gen.mask_id).sum()) == 0


def test_missing_bundled_model_says_how_to_rebuild(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundled, "MODELS_DIR", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--checkpoint", "wiki-small", "--prefix", "x"]) == 2
    err = capsys.readouterr().err
    assert "recipes/wiki-small.yaml" in err and "--config" in err and "python -m textdiffusion.models.bundled" in err
    assert main(["generate", "--checkpoint", "wiki-small-sdtt", "--prefix", "x"]) == 2  # distilled, not trained
    err = capsys.readouterr().err
    assert "textdiffusion distill --config recipes/wiki-small-sdtt.yaml" in err and "--run runs/wiki-small-sdtt/round-1" in err


def test_export_writes_fp16_weights_and_keeps_the_card(tmp_path, tokenizer):
    from safetensors import safe_open

    from textdiffusion.config import DiffusionConfig
    from textdiffusion.models.presets import build_preset_model

    run = tmp_path / "run"
    build_preset_model("micro", tokenizer, 32).save_pretrained(run)
    tokenizer.save_pretrained(run)
    DiffusionConfig(max_length=32).save_pretrained(run)
    dest = tmp_path / "models" / "wiki-small"
    dest.mkdir(parents=True)
    (dest / "README.md").write_text("card")
    bundled.export_bundled(str(run), "wiki-small", dest=dest)
    assert (dest / "README.md").read_text() == "card" and (dest / "diffusion_config.json").exists()
    with safe_open(dest / "model.safetensors", "pt") as f:
        assert all(str(f.get_tensor(k).dtype) == "torch.float16" for k in f.keys())
    assert not dest.with_name("wiki-small.partial").exists()


@pytest.mark.slow
def test_demo_runs_in_its_short_mode(tmp_path, capsys):
    from textdiffusion.cli.demo import main as demo

    out = tmp_path / "demo"
    assert demo(["--quick", "--output-dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"results: {out}/" in printed
    readme = (out / "README.md").read_text()
    assert "| NELBO |" in readme and "After fine-tuning on Austen" in readme and "From `smollm2-bd`" in readme
    assert (out / "before_after.png").exists() and (out / "austen-model" / "model.safetensors").exists()
    before = json.loads((out / "eval_before" / "eval.json").read_text())
    assert before["dataset"] == "austen" and len(before["per_level"]) == 10
    (out / "mine.txt").write_text("x")  # a rerun replaces an earlier demo, but never a folder of other files
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert demo(["--quick", "--output-dir", str(other)]) == 2
    assert (other / "notes.txt").read_text() == "keep"


def test_a_built_ready_model_says_how_to_build_it_then_loads_by_name(tmp_path, monkeypatch, tokenizer, capsys):
    """mpnet-wiki is too large to ship: its short name points into the cache, where `make mpnet-wiki` exports it."""
    from textdiffusion.config import DiffusionConfig
    from textdiffusion.models.presets import build_preset_model
    from textdiffusion.pipelines.generation import DiffusionGenerator

    monkeypatch.setenv("TEXTDIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--checkpoint", "mpnet-wiki", "--prefix", "x"]) == 2
    err = capsys.readouterr().err
    assert "make mpnet-wiki" in err and "--into-cache" in err and str(tmp_path / "cache") in err

    run = tmp_path / "run"
    build_preset_model("micro", tokenizer, 32).save_pretrained(run)
    tokenizer.save_pretrained(run)
    DiffusionConfig(max_length=32).save_pretrained(run)
    assert bundled.main(["--run", str(run), "--name", "mpnet-wiki", "--into-cache", "--generation", "steps=0"]) == 2
    assert "steps" in capsys.readouterr().err and not (tmp_path / "cache" / "models" / "mpnet-wiki").exists()
    assert bundled.main(["--run", str(run), "--name", "wiki-small", "--into-cache"]) == 2  # a shipped model
    assert bundled.main(["--run", str(run), "--name", "mpnet-wiki", "--into-cache",
                         "--generation", "steps=8", "block_length=16", "repetition_penalty=1.1"]) == 0
    gen = DiffusionGenerator.from_pretrained("mpnet-wiki")
    assert (gen.config.generation.steps, gen.config.generation.block_length) == (8, 16)
    assert gen.config.generation.repetition_penalty == 1.1
    card = Path(bundled.resolve_checkpoint("mpnet-wiki")) / "README.md"
    assert card.read_text() == (bundled.MODELS_DIR / "mpnet-wiki" / "README.md").read_text()  # the shipped card
    card.write_text("an older card")
    assert bundled.main(["--run", str(run), "--name", "mpnet-wiki", "--into-cache"]) == 0  # re-export: it is replaced
    assert card.read_text() == (bundled.MODELS_DIR / "mpnet-wiki" / "README.md").read_text()
    # without --generation the export saves the measured defaults (bundled.BUILT), not the sampler's
    saved = DiffusionGenerator.from_pretrained("mpnet-wiki").config.generation
    assert {k: getattr(saved, k) for k in bundled.BUILT["mpnet-wiki"].generation} == bundled.BUILT["mpnet-wiki"].generation


def test_the_ar_baseline_ships_and_loads_by_its_short_name():
    """wiki-small-ar: a causal LM on wiki-small's tokenizer, found by name by every reader of causal checkpoints."""
    from textdiffusion.models.autoregressive import load_causal_lm
    from textdiffusion.models.bundled import resolve_checkpoint
    from textdiffusion.models.checkpoints import checkpoint_objective
    from textdiffusion.pipelines.objectives import objective_of_checkpoint

    path = resolve_checkpoint("wiki-small-ar")
    assert checkpoint_objective(path) == "ar" and objective_of_checkpoint(path).name == "ar"
    tokenizer, model = load_causal_lm("wiki-small-ar")
    assert model.config.model_type == "gpt2" and model.config.n_positions >= 128
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(resolve_checkpoint("wiki-small")).get_vocab() == tokenizer.get_vocab()


def test_the_distilled_model_ships_with_its_recipe_and_the_gates_verdict():
    """wiki-small-sdtt: wiki-small after one SDTT round (recipes/wiki-small-sdtt.yaml), its run record and the
    round's verdict beside it; it samples with the step count its card justifies."""
    import dataclasses

    from textdiffusion.config import DiffusionConfig
    from textdiffusion.pipelines.distill_run import DistillArgs

    path = Path(bundled.resolve_checkpoint("wiki-small-sdtt"))
    recipe = yaml.safe_load((ROOT / "recipes" / "wiki-small-sdtt.yaml").read_text())
    run_args = json.loads((path / "run_args.json").read_text())
    aliases = {"batch_size": "per_device_train_batch_size"}
    for key, value in recipe.items():
        assert run_args[aliases.get(key, key)] == value, key
    assert set(recipe) <= {f.name for f in dataclasses.fields(DistillArgs)} | set(aliases)
    rounds = (path / "distill_rounds.csv").read_text().splitlines()
    assert len(rounds) == 2 and rounds[1].split(",")[2:4] == ["32", "16"]
    teacher = DiffusionConfig.from_pretrained(bundled.resolve_checkpoint("wiki-small"))
    saved = DiffusionConfig.from_pretrained(path)
    assert saved.generation == teacher.generation  # the teacher's sampler, at the steps that held the quality (32)
    assert (path / "model.safetensors").stat().st_size < bundled.MAX_BUNDLED_MB * 2**20
    assert "textdiffusion distill" in (path / "README.md").read_text()  # the model card

