"""DiffusionConfig: one home for a checkpoint's settings, saved beside the weights, read by every consumer."""

import json
import os

import pytest

from textdiffusion.cli.main import main
from textdiffusion.config import CONFIG_NAME, ConfigError, CorruptionConfig, DiffusionConfig, SamplerConfig
from textdiffusion.models import bundled

LEGACY = {"cls_token_id": 0, "loss_weighting": "none", "mask_per": "example", "mask_probs": [0.5, 1.0],
          "mask_token_id": 4, "max_length": 128, "objective": "diffusion", "prefix_length": 5,
          "random_prefix_max": 0, "schedule": "linear", "sep_token_id": 2, "time_sampling": "grid",
          "trained_with": "textdiffusion"}


def test_round_trip_keeps_every_field(tmp_path):
    config = DiffusionConfig(max_length=64, mask_token_id=4, cls_token_id=0, sep_token_id=2,
                             corruption=CorruptionConfig(time_sampling="antithetic", prefix_length=3, doc_end_fraction=0.5),
                             generation=SamplerConfig(steps=8, strategy="margin", block_length=16))
    config.save_pretrained(tmp_path)
    again = DiffusionConfig.from_pretrained(tmp_path)
    assert again == config
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["version"] == 2
    assert not list(tmp_path.glob(".diffusion_config.*"))  # written aside, renamed into place
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / CONFIG_NAME).stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as the model beside it


def test_a_version_1_file_still_loads_with_what_was_true_of_it(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(LEGACY))
    config = DiffusionConfig.from_pretrained(tmp_path)
    assert config.max_length == 128 and config.prefix_length == 5 and config.mask_token_id == 4
    assert config.corruption.mask_probs == [0.5, 1.0] and config.corruption.mask_per == "example"
    assert config.corruption.learn_eos is False and config.corruption.doc_end_fraction == 0.0
    assert config.generation == SamplerConfig()


def test_a_foreign_model_gets_one_set_of_defaults(tmp_path):
    config = DiffusionConfig.from_pretrained(tmp_path)  # no file: a masked LM from elsewhere
    assert config.prefix_length == 0 and config.max_length == 128 and not config.corruption.learn_eos


def test_the_bundled_model_config_loads():
    config = DiffusionConfig.from_pretrained(bundled.resolve_checkpoint("wiki-small"))
    assert config.objective == "diffusion" and config.max_length == 128 and config.prefix_length == 5


def test_a_newer_version_is_refused_with_a_clear_error(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version 99, newer than"):
        DiffusionConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, name", [
    ({"time_sampling": "sideways"}, "time_sampling"), ({"mask_probs": [0.0]}, "mask_probs"),
    ({"t_min": 1.0}, "t_min"), ({"prefix_length": -1}, "prefix_length"), ({"doc_end_fraction": 2.0}, "doc_end_fraction"),
    ({"random_prefix_max": 3, "prefix_length": 5}, "random_prefix_max"),
])
def test_each_corruption_setting_is_checked_in_one_place(kwargs, name):
    with pytest.raises(ConfigError) as e:
        CorruptionConfig(**kwargs)
    assert e.value.name == name and f"--{name.replace('_', '-')}" in e.value.as_flag_message()


def test_generate_takes_its_defaults_from_the_checkpoint_and_flags_win(tmp_path, tokenizer, capsys, monkeypatch):
    """The saved generation settings are the defaults; a flag given on the command line overrides only itself."""
    from textdiffusion.models.presets import build_preset_model
    from textdiffusion.pipelines.generation import DiffusionGenerator

    build_preset_model("micro", tokenizer, 32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    DiffusionConfig(max_length=20, generation=SamplerConfig(steps=3, strategy="margin", top_k=7)).save_pretrained(tmp_path)
    seen = {}
    original = DiffusionGenerator.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.update(kwargs, resolved=out.config)
        return out

    monkeypatch.setattr(DiffusionGenerator, "generate", spy)
    assert main(["generate", "--checkpoint", str(tmp_path), "--hide-steps", "--top-k", "9"]) == 0
    resolved = seen["resolved"]
    assert (resolved.steps, resolved.strategy, resolved.top_k) == (3, "margin", 9)
    assert seen["max_length"] is None  # -> the checkpoint's 20
    assert "3 planned steps" in capsys.readouterr().out


def test_sampler_ranges_are_declared_once_and_the_server_schema_follows_them():
    """SamplerConfig.RANGES is the one declaration: a value just outside a bound is refused by the sampler's own
    check and by the server's request schema alike."""
    pydantic = pytest.importorskip("pydantic")
    from textdiffusion.config import ConfigError, SamplerConfig
    from textdiffusion.serving.schemas import GenerateRequest

    outside = {"gt": lambda b: b, "ge": lambda b: b - 1, "lt": lambda b: b, "le": lambda b: b + 1}
    checked = 0
    for name, spec in SamplerConfig.RANGES.items():
        for kind, bound in spec.items():
            if kind not in outside:
                continue
            value = outside[kind](bound)
            value = float(value) if isinstance(SamplerConfig.__dataclass_fields__[name].default, float) else value
            with pytest.raises(ConfigError, match=f"`{name}`"):
                SamplerConfig(**{name: value})
            with pytest.raises(pydantic.ValidationError, match=name):
                GenerateRequest(prompt="x", **{name: value})
            checked += 1
    assert checked >= 12
