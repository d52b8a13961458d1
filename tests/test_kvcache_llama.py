"""The key/value cache for a Llama-family causal LM adapted to diffusion (issue 23): rotary, grouped-query
attention, full attention and shifted logits.

Invariants: a fresh cache gives the denoiser's own logits, the block's first position included (its logit
comes from the state just before the block, which the cached step must recompute); refreshed at every step
the cached forward is the uncached one and generation gives the uncached samples; per-block refresh runs
and fills every position; rows join and leave the cache as for the other families; a bare causal LM is
refused; the exported checkpoint keeps the shift and the special tokens; bad input is one line.
"""

import dataclasses

import pytest
import torch
from test_adapt import causal_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from textdiffusion.cli.main import main
from textdiffusion.config import DiffusionConfig
from textdiffusion.errors import UsageError
from textdiffusion.models.adapt import CausalDiffusionLM, choose_special_tokens
from textdiffusion.models.kvcache import DenoisingKVCache, cache_support
from textdiffusion.pipelines.denoising import DenoisingRun
from textdiffusion.pipelines.generation import DiffusionGenerator

V = 300


def tiny_llama(vocab: int = V, init: float = 0.02) -> LlamaForCausalLM:
    """SmolLM2's shape in miniature: 4 query heads sharing 2 key/value heads, tied embeddings."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=100000.0, tie_word_embeddings=True, initializer_range=init,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def batch(b=3, l=24):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, V, (b, l), generator=g)
    attention = torch.ones_like(x)
    attention[1, 18:] = 0  # a shorter row, padded on the right
    x[1, 18:] = 2
    return x, attention


@pytest.fixture(scope="module")
def denoiser():
    return CausalDiffusionLM(tiny_llama(init=0.2)).eval()  # weights large enough that a wrong mask or shift shows


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_fresh_cache_gives_the_denoisers_shifted_logits(denoiser, mode):
    x, attention = batch()
    region = torch.zeros_like(x, dtype=torch.bool)
    region[:, 6:12] = True
    positions = region & (torch.arange(x.shape[1]) % 2 == 0)  # 6, 8, 10: position 6 reads the state at 5
    with torch.no_grad():
        reference = denoiser(input_ids=x, attention_mask=attention, masked_positions=positions)
    cache = DenoisingKVCache(denoiser, mode)
    first = cache.logits(x, attention, region, positions)
    again = cache.logits(x, attention, region, positions)
    assert (cache.full_rows, cache.partial_rows) == (3, 3)  # the second call took the cached path
    assert cache.keys[0].shape == (3, 2, 24, 16)  # the key/value heads only (grouped-query attention)
    torch.testing.assert_close(first, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-4)


def test_per_step_refresh_is_the_uncached_forward_as_tokens_change(denoiser):
    x, attention = batch()
    region = torch.zeros_like(x, dtype=torch.bool)
    region[:, 8:14] = True
    cache = DenoisingKVCache(denoiser, "dual", refresh="step")
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # tokens change inside the block and before it between calls
        with torch.no_grad():
            reference = denoiser(input_ids=x, attention_mask=attention, masked_positions=region)
        torch.testing.assert_close(cache.logits(x, attention, region, region), reference, atol=1e-5, rtol=1e-4)
        x = torch.where(torch.rand(x.shape, generator=g) < 0.3, torch.randint(5, V, x.shape, generator=g), x)
    assert cache.partial_rows == 0 and cache.full_rows == 9


def test_a_block_at_position_0_and_rows_in_different_blocks(denoiser):
    """The shift clamps at position 0 (it reads its own state); a row starting a block and a row inside its
    block share one call and each gets the denoiser's logits (unchanged tokens: the cache is exact)."""
    x, attention = batch(b=2)
    region = torch.zeros_like(x, dtype=torch.bool)
    region[0, 0:6] = True
    region[1, 10:16] = True

    def reference(where):
        with torch.no_grad():
            return denoiser(input_ids=x, attention_mask=attention, masked_positions=where)

    cache = DenoisingKVCache(denoiser, "prefix")
    torch.testing.assert_close(cache.logits(x, attention, region, region), reference(region), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.logits(x, attention, region, region), reference(region), atol=1e-5, rtol=1e-4)
    assert (cache.full_rows, cache.partial_rows) == (2, 2)
    region2 = region.clone()
    region2[0] = False
    region2[0, 6:12] = True  # row 0 moves on to its next block; row 1 continues its block from the cache
    cache.full_rows = cache.partial_rows = 0
    torch.testing.assert_close(cache.logits(x, attention, region2, region2), reference(region2), atol=1e-5, rtol=1e-4)
    assert (cache.full_rows, cache.partial_rows) == (1, 1)


def test_a_bare_causal_lm_or_an_annealing_one_is_refused():
    model = tiny_llama()
    assert "adapted to diffusion" in cache_support(model)  # a plain causal LM: unshifted, causal attention
    with pytest.raises(ValueError, match="--adapt-from-causal"):
        DenoisingKVCache(model, "dual")
    training = CausalDiffusionLM(model, anneal_steps=10).train()
    training.set_step(3)
    assert "full attention" in cache_support(training)
    assert cache_support(CausalDiffusionLM(model).eval()) is None


# -- generation through the cache --------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapted(wiki):
    """(tokenizer, model) as `train --adapt-from-causal` leaves them: a mask and a padding token of its own."""
    tokenizer = causal_tokenizer(wiki.train[:200])
    model = tiny_llama(vocab=len(tokenizer), init=0.1)
    choose_special_tokens(tokenizer, model)
    return tokenizer, model


@pytest.fixture(scope="module")
def generator(adapted):
    tokenizer, model = adapted
    config = DiffusionConfig(max_length=40, mask_token_id=tokenizer.mask_token_id, adapted_from_causal=True)
    return DiffusionGenerator(model, tokenizer, config, device="cpu")


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_refresh_every_step_gives_the_uncached_samples(generator, mode):
    prompts = ["The river", "In 1905 the city of"]  # different lengths: rows padded, blocks at different places
    kw = dict(max_length=40, block_length=8, steps=12, seed=3)
    plain = generator.generate(prompts, cache="none", **kw)
    cached = generator.generate(prompts, cache=mode, cache_refresh="step", **kw)
    assert not any("without the cache" in n for n in cached.notes)
    assert torch.equal(cached.token_ids, plain.token_ids) and cached.nfe == plain.nfe


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_per_block_refresh_runs_and_fills_the_same_positions(generator, mode):
    kw = dict(max_length=40, block_length=8, steps=10, seed=0)
    plain = generator.generate(["The river", "In 1905 the city of"], cache="none", **kw)
    out = generator.generate(["The river", "In 1905 the city of"], cache=mode, **kw)
    assert out.token_ids.shape == plain.token_ids.shape
    assert not bool((out.token_ids == generator.mask_id).any())
    editable = generator.build_batch([generator.prompt_template(p, 40) for p in ("The river", "In 1905 the city of")])[1]
    assert torch.equal(out.token_ids[~editable], plain.token_ids[~editable])  # the prompts and specials kept
    assert out.texts[0].startswith("The river") and out.texts[1].startswith("In 1905 the city of")


def test_auto_cache_is_dual_for_the_adapted_model(generator):
    kw = dict(max_length=24, steps=6, seed=0, block_length=8)
    run = DenoisingRun(generator, "auto")
    assert run.unsupported is None
    assert torch.equal(generator.generate(["The river"], cache="auto", **kw).token_ids,
                       generator.generate(["The river"], cache="dual", **kw).token_ids)


def _alone(generator, templates, config, seed):
    run = DenoisingRun(generator, "auto")
    group = run.add(templates, config, seed=seed)
    run.run_to_end()
    return run.result(group).texts, run.kv.full_rows


def test_rows_join_and_leave_without_recomputing_the_others(generator):
    """test_denoising's arrival and departure, for this family: a group that joins (longer rows: every cached
    row is widened) and one that leaves change nobody's text and cost no one a full forward."""
    cfg = lambda **kw: dataclasses.replace(generator.config.generation, **kw)  # noqa: E731
    a_cfg, b_cfg = cfg(steps=8, block_length=8), cfg(steps=12, block_length=6, temperature=0.8)
    a_t, b_t, c_t = ["The river<mask:16>"] * 2, ["A city<mask:24>"] * 3, ["Rivers<mask:16>"]
    a_alone, a_full = _alone(generator, a_t, a_cfg, seed=1)
    b_alone, b_full = _alone(generator, b_t, b_cfg, seed=9)
    run = DenoisingRun(generator, "auto")
    a = run.add(a_t, a_cfg, seed=1)
    c = run.add(c_t, a_cfg, seed=4)
    for _ in range(3):
        run.step()
    run.remove(c)  # leaves mid-block
    assert run.kv.keys[0].shape[0] == 2
    b = run.add(b_t, b_cfg, seed=9)
    run.run_to_end()
    assert run.result(a).texts == a_alone and run.result(b).texts == b_alone
    assert run.kv.full_rows == a_full + b_full + 1  # and c's one block start before it left


# -- the exported checkpoint and bad input ------------------------------------------------------------------
def test_the_export_keeps_the_shift_and_the_special_tokens(adapted, tmp_path):
    from textdiffusion.models.bundled import export_bundled

    tokenizer, model = adapted
    run = tmp_path / "run"
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    DiffusionConfig(max_length=24, mask_token_id=tokenizer.mask_token_id, adapted_from_causal=True).save_pretrained(run)
    dest = export_bundled(str(run), "tiny-adapted", dest=tmp_path / "export", max_mb=None)
    assert DiffusionConfig.from_pretrained(dest).adapted_from_causal  # the shift travels with the weights
    exported = DiffusionGenerator.from_pretrained(str(dest), device="cpu")
    assert type(exported.denoiser) is CausalDiffusionLM
    ours = exported.tokenizer
    assert (ours.mask_token, ours.pad_token) == (tokenizer.mask_token, tokenizer.pad_token) == ("<empty_output>", "<file_sep>")
    assert (ours.mask_token_id, ours.pad_token_id) == (tokenizer.mask_token_id, tokenizer.pad_token_id)
    assert exported.model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    rounded = tiny_llama(vocab=len(tokenizer), init=0.1)  # the same weights through fp16, as the export stores them
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    ids = torch.randint(5, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.denoiser(input_ids=ids).logits,
                                   CausalDiffusionLM(rounded).eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_a_causal_lm_without_the_adaptation_flag_is_a_one_line_error(adapted, tmp_path, capsys):
    tokenizer, model = adapted
    model.save_pretrained(tmp_path / "causal")
    tokenizer.save_pretrained(tmp_path / "causal")
    capsys.readouterr()  # the save's progress bar
    for name in (str(tmp_path / "causal"), "smollm2"):
        assert main(["train", "--model-name", name, "--output-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a causal LM" in err and "add --adapt-from-causal" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match=r"LlamaForCausalLM\), not a masked LM: .*adapted_from_causal") as e:
        DiffusionGenerator.from_pretrained(str(tmp_path / "causal"))  # the Python API: no AR fallback here
    assert len(str(e.value).splitlines()) == 1


def test_a_gguf_that_is_not_a_llama_is_refused_from_its_header(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny-gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code = main(["train", "--adapt-from-causal", "--model-name", str(path), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "Llama family" in err and "a GGUF of 'gemma3'" in err and str(path) in err


def test_the_server_serves_the_adapted_model_as_generate_does(generator):
    """The adapted model behind `textdiffusion serve` (issue 23, part 5): concurrent requests batched through the
    Llama cache give what generating each alone gives, and the stream ends with no mask left."""
    import asyncio

    import httpx
    from test_serve import alone, live_server, sse_events

    requests = [{"prompt": "The river", "seed": 1, "max_length": 32, "steps": 8, "block_length": 8},
                {"prompt": "In 1905 the city of", "seed": 2, "n": 2, "max_length": 36, "steps": 6, "block_length": 4}]
    with live_server(generator, max_batch=8, max_queue=4, tick_delay=0.01) as base:
        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/generate", json=r) for r in requests))

        responses = asyncio.run(go())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        for req, r in zip(requests, responses):
            assert r.json()["texts"] == alone(generator, req), req
        with httpx.Client(base_url=base, timeout=60) as c, \
                c.stream("POST", "/v1/generate", json={**requests[0], "stream": True}) as r:
            events = list(sse_events(r.iter_lines()))
    kind, final = events[-1]
    assert kind == "done" and final["masked"] == 0 and final["texts"] == alone(generator, requests[0])
