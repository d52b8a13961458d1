"""The mpnet recipes are valid `train` configs (every key a flag, every value accepted) and agree on the data."""

from pathlib import Path

import pytest
import yaml

from textdiffusion.cli.main import _parse
from textdiffusion.pipelines.training_args import TrainArgs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["mpnet-wiki", "mpnet-wiki-gpu", "mpnet6-wiki"])
def test_recipe_parses(name):
    args = _parse(TrainArgs, ["--config", str(RECIPES / f"{name}.yaml")], "textdiffusion train")
    assert args.model_name == "mpnet-base" and args.preset is None and args.head_init == "built"
    assert args.output_dir == f"runs/{name}"
    base = yaml.safe_load((RECIPES / "mpnet-wiki.yaml").read_text())
    assert (args.dataset, args.max_length, list(args.mask_probs)) == (base["dataset"], base["max_length"], base["mask_probs"])
    assert args.keep_layers == (6 if name == "mpnet6-wiki" else 0)
    assert args.precision == ("bf16" if name.endswith("gpu") else "fp32")  # CPUs without AMX emulate bf16
