"""The one denoising run that `generate()` and the server drive: groups (requests) join and leave between
steps, cached groups keep their keys/values through arrivals and departures, and a group's text is the one
it gets alone."""

import dataclasses

import pytest
import torch

from textdiffusion.errors import UsageError
from textdiffusion.models.presets import build_preset_model
from textdiffusion.pipelines.denoising import DenoisingRun
from textdiffusion.pipelines.generation import DiffusionGenerator


@pytest.fixture(scope="module")
def generator(tokenizer):
    torch.manual_seed(0)
    return DiffusionGenerator(build_preset_model("micro", tokenizer, 64), tokenizer, {"max_length": 40}, device="cpu")


def _config(generator, **kw):
    return dataclasses.replace(generator.config.generation, **kw)


def _alone(generator, templates, config, seed):
    run = DenoisingRun(generator, "auto")
    group = run.add(templates, config, seed=seed)
    run.run_to_end()
    return run.result(group).texts, run.kv.full_rows if run.kv is not None else 0


def test_generate_is_the_run_driven_to_the_end(generator):
    config = _config(generator, steps=8, block_length=8)
    texts, _ = _alone(generator, ["The river<mask:16>"] * 2, config, seed=5)
    assert generator.generate(templates=["The river<mask:16>"] * 2, seed=5, steps=8, block_length=8).texts == texts


def test_a_group_that_joins_midway_changes_nobody_and_rebuilds_no_cache(generator):
    a_cfg = _config(generator, steps=8, block_length=8)
    b_cfg = _config(generator, steps=12, block_length=6, temperature=0.8)
    a_templates, b_templates = ["The river<mask:16>"] * 2, ["A city<mask:24>"] * 3  # different lengths too
    a_alone, a_full = _alone(generator, a_templates, a_cfg, seed=1)
    b_alone, b_full = _alone(generator, b_templates, b_cfg, seed=9)

    run = DenoisingRun(generator, "auto")
    a = run.add(a_templates, a_cfg, seed=1)
    for _ in range(3):
        run.step()
    b = run.add(b_templates, b_cfg, seed=9)  # joins with a longer row: every cached row is widened, none recomputed
    run.step()
    assert run.last_call_rows == 5
    run.run_to_end()
    assert run.result(a).texts == a_alone and run.result(b).texts == b_alone
    assert run.kv.full_rows == a_full + b_full  # each row's full forwards are its own block starts, nothing more
    assert run.kv.partial_rows > 0


def test_a_group_that_leaves_takes_only_its_own_cache_rows(generator):
    a_cfg = _config(generator, steps=8, block_length=8)
    b_alone, b_full = _alone(generator, ["Rivers<mask:16>"] * 2, a_cfg, seed=4)
    run = DenoisingRun(generator, "auto")
    a = run.add(["The river<mask:16>"] * 3, a_cfg, seed=1)
    b = run.add(["Rivers<mask:16>"] * 2, a_cfg, seed=4)
    run.step()
    run.step()
    full_before = run.kv.full_rows
    run.remove(a)  # cancelled mid-block
    assert run.kv.keys[0].shape[0] == 2  # only b's rows are left in the cache
    run.run_to_end()
    assert run.result(b).texts == b_alone
    assert run.kv.full_rows - full_before == b_full - 2  # b's later block starts only: its first was in the shared call


def test_uncached_and_cached_groups_share_a_step(generator):
    run = DenoisingRun(generator, "auto")
    blocks = run.add(["The river<mask:16>"], _config(generator, steps=8, block_length=8), seed=2)
    whole = run.add(["The river<mask:16>"], _config(generator, steps=8, block_length=None), seed=2)
    assert blocks.cached and not whole.cached
    run.run_to_end()
    alone = generator.generate(templates=["The river<mask:16>"], seed=2, steps=8, block_length=None).texts
    assert run.result(whole).texts == alone


def test_guidance_runs_through_the_cache_and_is_exact_with_per_step_refresh(generator):
    kw = dict(templates=["The river<mask:16>"] * 2, seed=3, steps=8, block_length=8, cfg_scale=1.5)
    exact = generator.generate(cache="dual", cache_refresh="step", **kw)
    assert not exact.notes  # the cache applies: no "generating without the cache" notice
    assert exact.texts == generator.generate(cache="none", **kw).texts


def test_named_cache_without_blocks_is_a_one_line_error(generator):
    with pytest.raises(UsageError, match="needs --block-length") as e:
        generator.generate(["The river"], cache="dual", steps=4)
    assert e.value.field == "block_length"
    with pytest.raises(UsageError, match="--cache must be one of") as e:
        DenoisingRun(generator, "sometimes")
    assert e.value.field == "cache" and e.value.value == "sometimes"
