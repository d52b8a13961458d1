"""Key/value reuse across denoising steps and entropy-bounded unmasking (issue 11).

Invariants: the cached forward equals the model's own logits when the cache is fresh, for every
supported architecture; refreshed at every step, cached generation gives the uncached samples; the
cache batches rows that are at different blocks and spends nothing on finished rows; EB commits the
largest entropy-bounded prefix; bad input is refused by name.
"""

import pytest
import torch

from textdiffusion.config import SamplerConfig
from textdiffusion.core.sampler import DenoisingSampler, DenoisingState, entropy_bounded
from textdiffusion.errors import UsageError
from textdiffusion.models.kvcache import DenoisingKVCache, cache_support
from textdiffusion.pipelines.generation import DiffusionGenerator

V = 120


def tiny(kind: str, init: float = 0.02):
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        ModernBertConfig,
        ModernBertForMaskedLM,
        MPNetConfig,
        MPNetForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    torch.manual_seed(0)
    size = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                initializer_range=init)
    if kind == "modernbert":  # local-first like the presets: sliding +-2 below, global above
        config = ModernBertConfig(**size, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  local_attention=4, pad_token_id=1, cls_token_id=0, sep_token_id=2, bos_token_id=0,
                                  eos_token_id=2)
        return ModernBertForMaskedLM(config).eval()
    bert_like = dict(size, max_position_embeddings=80, pad_token_id=1)
    if kind == "roberta":
        return RobertaForMaskedLM(RobertaConfig(**bert_like)).eval()
    if kind == "distilroberta":  # DistilRoBERTa is a 6-layer RoBERTa config
        return RobertaForMaskedLM(RobertaConfig(**dict(bert_like, num_hidden_layers=6))).eval()
    if kind == "bert":
        return BertForMaskedLM(BertConfig(**dict(bert_like, pad_token_id=0))).eval()
    return MPNetForMaskedLM(MPNetConfig(**bert_like)).eval()


KINDS = ["modernbert", "roberta", "distilroberta", "bert", "mpnet"]


def batch(model, b=3, l=24):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, V, (b, l), generator=g)
    attention = torch.ones_like(x)
    attention[1, 18:] = 0  # a shorter row, padded on the right
    x[1, 18:] = model.config.pad_token_id
    return x, attention


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_fresh_cache_gives_the_model_logits(kind, mode):
    """The first call of a block is a full forward; a later call on the same tokens reuses the cache and
    must give the same logits (to float tolerance) for the block's positions."""
    model = tiny(kind, init=0.2)  # weights large enough that a wrong mask or position shows
    x, attention = batch(model)
    region = torch.zeros_like(x, dtype=torch.bool)
    region[:, 6:12] = True
    positions = region & (torch.arange(x.shape[1]) % 2 == 0)  # a subset, as the sampler asks
    with torch.no_grad():
        reference = model(input_ids=x, attention_mask=attention).logits[positions]
    cache = DenoisingKVCache(model, mode)
    first = cache.logits(x, attention, region, positions)
    again = cache.logits(x, attention, region, positions)
    assert (cache.full_rows, cache.partial_rows) == (3, 3)  # the second call took the cached path
    torch.testing.assert_close(first, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-4)


def test_stale_cache_is_used_and_differs_only_through_the_cached_positions():
    """Change tokens before the block: prefix mode does not see it (cached keys), a fresh forward does."""
    model = tiny("modernbert", init=0.3)  # large weights: a changed token visibly moves the logits
    x, attention = batch(model)
    region = torch.zeros_like(x, dtype=torch.bool)
    region[:, 10:16] = True
    cache = DenoisingKVCache(model, "prefix")
    before = cache.logits(x, attention, region, region)
    changed = x.clone()
    changed[:, 2:5] = (changed[:, 2:5] + 7) % V  # prefix tokens the cache still holds
    stale = cache.logits(changed, attention, region, region)
    torch.testing.assert_close(stale, before, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        fresh = model(input_ids=changed, attention_mask=attention).logits[region]
    assert (fresh - before).abs().max() > 1e-2


@pytest.fixture(scope="module")
def generator(tokenizer):
    from textdiffusion.models.presets import build_preset_model

    torch.manual_seed(0)
    return DiffusionGenerator(build_preset_model("micro", tokenizer, 64), tokenizer, {"max_length": 40}, device="cpu")


def roberta_generator(tokenizer, kind):
    from transformers import MPNetConfig, MPNetForMaskedLM, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    size = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id)
    model = (MPNetForMaskedLM(MPNetConfig(**size)) if kind == "mpnet" else RobertaForMaskedLM(RobertaConfig(**size)))
    return DiffusionGenerator(model, tokenizer, {"max_length": 40}, device="cpu")


STRATEGIES = [dict(strategy="confidence", steps=12), dict(confidence_threshold=0.02, steps=12),
              dict(strategy="eb", eb_gamma=3.0, steps=12)]


@pytest.mark.parametrize("settings", STRATEGIES, ids=["confidence", "threshold", "eb"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_refresh_every_step_gives_the_uncached_samples(generator, settings, mode):
    prompts = ["The river", "In 1905 the city of"]  # different lengths: rows padded, blocks at different places
    kw = dict(max_length=40, block_length=8, seed=3, **settings)
    plain = generator.generate(prompts, **kw)
    cached = generator.generate(prompts, cache=mode, cache_refresh="step", **kw)
    assert torch.equal(cached.token_ids, plain.token_ids)
    assert cached.nfe == plain.nfe and cached.texts == plain.texts


@pytest.mark.parametrize("kind", ["roberta", "mpnet"])
def test_refresh_every_step_gives_the_uncached_samples_bert_family(tokenizer, kind):
    gen = roberta_generator(tokenizer, kind)
    kw = dict(max_length=32, block_length=8, steps=8, seed=1)
    plain = gen.generate(["The river", "A"], **kw)
    assert torch.equal(gen.generate(["The river", "A"], cache="dual", cache_refresh="step", **kw).token_ids, plain.token_ids)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_generation_completes_and_keeps_the_prompt(generator, tokenizer, mode):
    out = generator.generate(["The river", "In 1905 the city of"], max_length=40, block_length=8, steps=10,
                             strategy="eb", eb_gamma=2.0, cache=mode)
    assert not bool((out.token_ids == tokenizer.mask_token_id).any())
    assert out.texts[0].startswith("The river") and out.texts[1].startswith("In 1905 the city of")


def test_rows_at_different_blocks_batch_and_finished_rows_cost_nothing(generator):
    """One call: row 0 starts a new block (full forward), row 1 continues its block (cached queries only),
    row 2 is finished (no work). Each row's logits equal those of the same row run alone."""
    x, editable, attention = generator.build_batch(["The<mask:16>", "The<mask:16>", "The<mask:16>"])
    x = x.clone()
    filled = torch.randint(10, 500, x.shape, generator=torch.Generator().manual_seed(0))
    x[1] = torch.where(editable[1] & (torch.arange(x.shape[1]) < 10), filled[1], x[1])  # row 1: into block 2
    x[2] = torch.where(editable[2], filled[2], x[2])  # row 2: done
    sampler = DenoisingSampler(SamplerConfig(block_length=8), generator.mask_id)
    sampler.set_timesteps(4, editable)
    state = DenoisingState(x=x, editable=editable, generators=[torch.Generator()] * 3)
    region, needed = sampler.region(state), sampler.needed_positions(state)
    assert not bool(needed[2].any())
    cache = DenoisingKVCache(generator.model, "dual")
    cache.logits(x, attention, region, needed)  # the block start of rows 0 and 1
    x2 = x.clone()
    x2[0, 2] = 77  # row 0 commits a token in its block; row 1 waits
    state.x = x2
    region2 = sampler.region(state)
    region2[0] = region2[0] & (torch.arange(x.shape[1]) >= 3)  # pretend row 0 moved on to its next block
    needed2 = region2 & (x2 == generator.mask_id)
    cache.full_rows = cache.partial_rows = 0
    together = cache.logits(x2, attention, region2, needed2)
    assert (cache.full_rows, cache.partial_rows) == (1, 1)  # row 0 refreshed, row 1 reused, row 2 skipped
    alone = []
    for i in (0, 1):
        single = DenoisingKVCache(generator.model, "dual")
        single.logits(x[i:i + 1], attention[i:i + 1], region[i:i + 1], needed[i:i + 1])
        alone.append(single.logits(x2[i:i + 1], attention[i:i + 1], region2[i:i + 1], needed2[i:i + 1]))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_unsupported_architecture_falls_back_with_a_notice(tokenizer):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2,
                                                   hidden_dim=48, max_position_embeddings=64,
                                                   pad_token_id=tokenizer.pad_token_id))
    assert "distilbert" in cache_support(model)
    gen = DiffusionGenerator(model, tokenizer, {"max_length": 24}, device="cpu")
    kw = dict(max_length=24, block_length=8, steps=6, seed=0)
    out = gen.generate(["The river"], cache="prefix", **kw)
    assert any("distilbert" in n and "without the cache" in n for n in out.notes)
    assert torch.equal(out.token_ids, gen.generate(["The river"], **kw).token_ids)


def test_cache_needs_blocks_and_a_known_mode(generator):
    with pytest.raises(UsageError, match="--cache prefix .* needs --block-length"):
        generator.generate(["The river"], max_length=24, steps=4, cache="prefix")
    with pytest.raises(UsageError, match="--cache must be one of .* got 'triple'"):
        generator.generate(["The river"], max_length=24, steps=4, block_length=8, cache="triple")


def test_cli_refuses_a_bad_cache_mode_and_bad_gamma(capsys):
    from textdiffusion.cli.main import main

    for argv, message in ((["--cache", "dual", "--checkpoint", "no-such-dir-xyz"], "no-such-dir-xyz"),
                          (["--cache", "triple"], "--cache must be one of ('auto', 'none', 'prefix', 'dual'), got 'triple'"),
                          (["--strategy", "eb", "--eb-gamma", "0"], "--eb-gamma must be > 0"),
                          (["--eb-gamma", "-1.5"], "got -1.5")):
        assert main(["generate", "--hide-steps", *argv]) == 2
        assert message in capsys.readouterr().err


def test_eb_gamma_must_be_positive():
    with pytest.raises(ValueError, match="`eb_gamma` must be > 0.*got 0.0"):
        SamplerConfig(strategy="eb", eb_gamma=0.0)
    with pytest.raises(ValueError, match="`remask_fraction`.*'eb'"):
        SamplerConfig(strategy="eb", remask_fraction=0.2)


# -- the entropy-bounded rule -----------------------------------------------------------------------
def test_entropy_bounded_takes_the_largest_prefix_within_gamma():
    entropy = torch.tensor([[0.1, 0.5, 0.2, 3.0, 0.0, 0.4],
                            [5.0, 6.0, 0.0, 0.0, 0.0, 0.0]])
    masked = torch.tensor([[True, True, True, True, False, True],
                           [True, True, False, False, False, False]])
    chosen = entropy_bounded(-entropy, entropy, masked, gamma=0.75)
    # row 0 by entropy: 0.1, 0.2, 0.4, 0.5, 3.0 -> sums minus max: 0, 0.1, 0.3, 0.7, 1.2: the first four
    assert chosen[0].tolist() == [True, True, True, False, False, True]
    # row 1: 5.0 alone (0 <= gamma); adding 6.0 gives 11 - 6 = 5 > gamma; at least one is always taken
    assert chosen[1].tolist() == [True, False, False, False, False, False]
    everything = entropy_bounded(-entropy, entropy, masked, gamma=100.0)
    assert torch.equal(everything, masked)


def test_eb_commits_more_per_call_as_gamma_grows(generator):
    calls = [generator.generate(["The river"], max_length=40, strategy="eb", eb_gamma=g, order_temperature=0.0,
                                seed=0).nfe for g in (0.01, 12.0, 1e4)]
    assert calls[0] > calls[1] > calls[2] == 1  # a huge budget fills everything in one call
    assert calls[0] == 34  # a tiny one commits one token per call (at least one is always taken)


def test_eb_with_blocks_and_threshold_finishes(generator, tokenizer):
    out = generator.generate(["The river"], max_length=40, strategy="eb", eb_gamma=0.5, block_length=8,
                             confidence_threshold=0.01, seed=0)
    assert not bool((out.token_ids == tokenizer.mask_token_id).any())
    assert out.nfe >= 5  # four-plus blocks, each needs its own call


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_path_skips_steps_that_commit_nothing(generator, mode):
    """A cosine schedule over many steps has steps that unmask nothing: no model call, cached or not."""
    kw = dict(max_length=40, block_length=16, steps=40, schedule="cosine", seed=0)
    plain = generator.generate(["The river"], **kw)
    cached = generator.generate(["The river"], cache=mode, cache_refresh="step", **kw)
    assert cached.nfe == plain.nfe < plain.steps
    assert torch.equal(cached.token_ids, plain.token_ids)


def test_auto_cache_is_dual_with_blocks_and_none_without(generator):
    """`--cache auto` (generate's default) takes the dual cache where it applies, silently, and none elsewhere."""
    kw = dict(max_length=24, steps=6, seed=0)
    blocks = dict(kw, block_length=8)
    assert torch.equal(generator.generate(["The river"], cache="auto", **blocks).token_ids,
                       generator.generate(["The river"], cache="dual", **blocks).token_ids)
    plain = generator.generate(["The river"], cache="auto", **kw)
    assert torch.equal(plain.token_ids, generator.generate(["The river"], cache="none", **kw).token_ids)
    assert not any("cache" in n for n in plain.notes)
