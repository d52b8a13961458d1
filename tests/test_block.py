"""Block diffusion of a causal LM (models/block.py): the training forward, the exact block cache that decodes
with it, LoRA adapters switched per token, and the whole path through DenoisingRun — on a two-layer Llama."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from textdiffusion.config import DiffusionConfig, SamplerConfig
from textdiffusion.errors import UsageError
from textdiffusion.models.block import (
    BlockCorruption,
    BlockDiffusionLM,
    BlockKVCache,
    add_lora,
    block_loss,
    block_nelbo,
    exact_k_block_draw,
    noisy_block_mask,
)

V, B, MASK, PAD, BOS, EOS = 96, 4, 3, 0, 1, 2


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def adapted(seed: int = 0) -> BlockDiffusionLM:
    """A block denoiser whose adapters are far from zero, so that a wrong gate, mask or shift shows."""
    model = add_lora(tiny_llama(seed), 4, MASK)
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name or "trainable_tokens_delta" in name:
            torch.nn.init.normal_(p, std=0.3)
    return BlockDiffusionLM(model, B).eval()


def clean_rows(b: int = 3, l: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, V, (b, l), generator=g)
    x[:, 0] = BOS
    return x


def test_the_noisy_copy_sees_earlier_clean_blocks_and_its_own_block_only():
    mask = noisy_block_mask(8, 4, torch.ones(1, 8, dtype=torch.bool))[0, 0]  # [8, 16]
    clean, noisy = mask[:, :8], mask[:, 8:]
    assert not clean[:4].any() and clean[4:, :4].all() and not clean[4:, 4:].any()
    assert noisy[:4, :4].all() and not noisy[:4, 4:].any() and noisy[4:, 4:].all() and not noisy[4:, :4].any()


def test_the_gate_switches_the_adapters_off_per_token():
    base = tiny_llama()
    ids = clean_rows()
    with torch.no_grad():
        reference = base(ids).logits
    denoiser = adapted()
    with torch.no_grad():
        hidden, _ = denoiser.clean_pass(ids, None)  # adapters off: exactly the base model
        adapted_hidden = denoiser.backbone(input_ids=ids).last_hidden_state
    keep = torch.arange(V) != MASK  # the mask token's row is trained (tied head): it is never predicted
    assert torch.equal(denoiser._head(hidden)[..., keep], reference[..., keep])
    assert not torch.allclose(denoiser._head(adapted_hidden)[..., keep], reference[..., keep], atol=1e-3)


def test_the_first_position_of_a_block_is_the_base_models_next_token_prediction():
    denoiser = adapted()
    ids = clean_rows()
    x_t = ids.clone()
    x_t[:, 4:] = MASK  # every block after the first fully masked
    with torch.no_grad():
        logits = denoiser(input_ids=x_t, clean_ids=ids).logits  # [b, l, V]
        base = tiny_llama()(ids).logits
    keep = torch.arange(V) != MASK
    for start in (4, 8, 12):  # the causal LM's prediction at start - 1, untouched by the adapters
        assert torch.allclose(logits[:, start, keep], base[:, start - 1, keep], atol=1e-5)
    assert not torch.allclose(logits[:, 5], base[:, 4], atol=1e-3)  # inside a block: adapted


def decode_block_by_block(denoiser, clean, x_t):
    """Logits [b, l, V] of every position after block 0, each block decoded after its clean prefix through the cache."""
    b, l = clean.shape
    cache = BlockKVCache(denoiser, PAD, MASK)
    cache.add_rows(b, l, clean.device)
    out = torch.zeros(b, l, V)
    attention = torch.ones(b, l, dtype=torch.long)
    for start in range(B, l, B):
        x = clean.clone()
        x[:, start:start + B] = x_t[:, start:start + B]
        region = torch.zeros(b, l, dtype=torch.bool)
        region[:, start:start + B] = True
        out[region] = cache.logits(x, attention, region, region).view(-1, V)
    return out


def test_the_one_forward_training_logits_equal_decoding_each_block_through_the_cache():
    denoiser = adapted()
    clean = clean_rows()
    batch = BlockCorruption(MASK, PAD, B, complementary=False, seed=3)([{"input_ids": r} for r in clean])
    x_t = batch["input_ids"]
    with torch.no_grad():
        trained = denoiser(input_ids=x_t, clean_ids=clean).logits
    decoded = decode_block_by_block(denoiser, clean, x_t)
    assert torch.allclose(trained[:, B:], decoded[:, B:], atol=1e-5)


def test_full_fine_tuning_computes_the_clean_copy_with_the_trained_weights():
    denoiser = BlockDiffusionLM(tiny_llama(), B).train()
    assert denoiser.gate is None and not denoiser.frozen_clean
    clean = clean_rows()
    batch = BlockCorruption(MASK, PAD, B, seed=1)([{"input_ids": r} for r in clean])
    block_loss(denoiser, batch).backward()
    grads = [p.grad for p in denoiser.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)  # every weight trains, through both copies


def test_lora_trains_only_the_adapters_and_the_mask_row():
    denoiser = adapted().train()
    clean = clean_rows()
    batch = BlockCorruption(MASK, PAD, B, seed=1)([{"input_ids": r} for r in clean])
    loss = block_loss(denoiser, batch, "elbo")
    loss.backward()
    trained = {n for n, p in denoiser.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "trainable_tokens" in n for n in trained)
    assert all(p.grad is not None for n, p in denoiser.model.named_parameters() if p.requires_grad)


def test_corruption_levels_per_block_complementary_masks_and_a_clean_first_block():
    corruption = BlockCorruption(MASK, PAD, B, protected_token_ids=(BOS,), complementary=True, seed=0)
    clean = clean_rows(b=8, l=32)
    batch = corruption([{"input_ids": r} for r in clean])
    x_t, labels = batch["input_ids"], batch["labels"]
    assert x_t.shape == (16, 32) and torch.equal(batch["clean_ids"], clean)
    first, second = x_t[0::2] == MASK, x_t[1::2] == MASK
    assert not (first & second).any() and torch.equal(first | second, corruption.maskable(clean))
    assert not (x_t[:, :B] == MASK).any()  # block 0 is the context
    assert torch.equal(labels[x_t == MASK], clean.repeat_interleave(2, 0)[x_t == MASK])
    # the level is one per block: within a block the weight (1/t) is constant
    weights = batch["loss_weight"].view(16, 8, B)
    assert torch.equal(weights, weights[..., :1].expand_as(weights))
    again = BlockCorruption(MASK, PAD, B, protected_token_ids=(BOS,), complementary=True, seed=0)
    assert torch.equal(again([{"input_ids": r} for r in clean])["input_ids"], x_t)  # (seed, batch) -> masks


def test_block_nelbo_is_finite_and_above_the_exact_nll_of_a_perfect_block_model():
    denoiser = adapted()
    clean = clean_rows(b=4, l=16)
    bound = block_nelbo(denoiser, clean, BlockCorruption(MASK, PAD, B), samples_per_block=2, batch_size=4)
    assert 0 < bound.nats_per_token < 50 and bound.stderr >= 0 and "blocks of 4" in bound.estimator
    assert bound.tokens == 4 * (16 - B)


def test_exact_k_draws_cover_every_k_of_a_block_once_per_cycle_and_weight_it_n_over_k():
    maskable = torch.ones(3, 12, dtype=torch.bool)
    maskable[:, :B] = False  # a clean first block: nothing to score there
    maskable[1, 5] = False  # a block with 3 maskable tokens
    g = torch.Generator().manual_seed(0)
    draws = [exact_k_block_draw(maskable, B, s, B, g) for s in range(B)]
    for masked, _ in draws:
        assert not (masked & ~maskable).any()
    counts = torch.stack([m.view(3, 3, B).sum(-1) for m, _ in draws])  # [draw, row, block]
    assert (counts[:, :, 0] == 0).all()
    assert sorted(counts[:, 0, 1].tolist()) == [1, 2, 3, 4]  # a full block: every k once in B draws
    assert sorted(counts[:, 1, 1].tolist()) in ([1, 1, 2, 3], [1, 2, 2, 3], [1, 2, 3, 3])  # n = 3 in 4 strata
    for masked, weight in draws:
        k = masked.view(3, 3, B).sum(-1)[0, 2]
        assert weight[0, 2 * B] == pytest.approx(B / k.item())


def test_the_exact_k_block_bound_estimates_the_continuous_one_with_less_variance():
    denoiser = adapted()
    clean = clean_rows(b=4, l=16)
    corruption = BlockCorruption(MASK, PAD, B)

    def estimates(estimator, samples):
        return torch.tensor([block_nelbo(denoiser, clean, corruption, samples_per_block=samples, seed=seed,
                                         estimator=estimator).nats_per_token for seed in range(6)])

    exact, continuous = estimates("exact-k", 8), estimates("continuous", 4)  # the same 8 forwards per row each
    assert exact.std() < continuous.std()
    assert abs(exact.mean() - continuous.mean()) < 3 * (continuous.std() / 6 ** 0.5 + exact.std() / 6 ** 0.5)


# -- through DenoisingRun --------------------------------------------------------------------------------
class ToyTokenizer:
    """Just what DiffusionGenerator reads of a tokenizer: ids from space-separated numbers."""

    mask_token_id, pad_token_id, bos_token_id, eos_token_id = MASK, PAD, BOS, EOS
    cls_token_id = sep_token_id = None
    name_or_path = "toy"
    all_special_ids = [PAD, BOS, EOS, MASK]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def get_vocab(self):
        return {}

    def decode(self, ids, **kwargs):
        return " ".join(str(i) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def toy_generator(denoiser):
    from textdiffusion.pipelines.generation import DiffusionGenerator

    config = DiffusionConfig(adapted_from_causal=True, block_size=B, max_length=32)
    generator = DiffusionGenerator(denoiser.model, ToyTokenizer(), config, device="cpu")
    return generator


def test_generation_through_the_run_matches_an_uncached_greedy_decode():
    """Left to right, one token per call, greedy: the cached decoder gives the tokens that the training forward
    (no cache: every call recomputes the prefix) gives."""
    denoiser = adapted()
    generator = toy_generator(denoiser)
    prompt = "10 11 12"  # with BOS: one whole block, so the blocks line up with the training forward's
    out = generator.generate([prompt], max_length=16, steps=12, strategy="left-to-right", sampling="greedy",
                             repetition_penalty=1.0, stop_at_eos=False)
    x = torch.tensor([[BOS, 10, 11, 12] + [MASK] * 11])  # then end-of-text, outside every block
    suppress = generator.suppress_ids(())
    while (x == MASK).any():
        i = int((x[0] == MASK).nonzero()[0])
        clean = x.masked_fill(x == MASK, PAD)
        with torch.no_grad():
            logits = denoiser(input_ids=x, clean_ids=clean).logits[0, i]
        logits[suppress + [MASK]] = float("-inf")
        x[0, i] = int(logits.argmax())
    assert out.token_ids[0, :15].tolist() == x[0].tolist()
    assert out.nfe == 11  # one model call per token; the prompt ran inside the first one


def test_rows_of_different_prompts_decode_as_they_do_alone():
    denoiser = adapted()
    generator = toy_generator(denoiser)
    prompts = ["10 11", "20 21 22 23 24 25", "30"]
    kwargs = dict(max_length=20, confidence_threshold=0.3, temperature=0.8, stop_at_eos=False, seed=5)
    together = generator.generate(prompts, **kwargs)
    for i, prompt in enumerate(prompts):
        alone = generator.generate([prompt], **{**kwargs, "seed": 5 + i})
        assert alone.token_ids[0].tolist() == together.token_ids[i][: alone.token_ids.shape[1]].tolist()


def test_the_threshold_rule_commits_at_least_one_token_per_row_per_call():
    denoiser = adapted()
    generator = toy_generator(denoiser)
    commits = []

    def count(nfe, state):
        commits.append((state.x != MASK).sum(1))

    out = generator.generate(["10 11", "12"], max_length=20, confidence_threshold=0.999, stop_at_eos=False,
                             on_step=count)
    assert not (out.token_ids == MASK).any()
    before = torch.stack([c for c in commits])
    steps = before[1:] - before[:-1]  # tokens committed per call after the first
    unfinished = (before[:-1] < out.token_ids.shape[1])
    assert (steps[unfinished] >= 1).all()


def test_what_needs_the_right_side_is_refused_in_one_line():
    generator = toy_generator(adapted())
    with pytest.raises(UsageError, match="infilling"):
        generator.generate(templates=["10 <mask:3> 11 12"], max_length=16)
    with pytest.raises(UsageError, match="cfg-scale"):
        generator.generate(["10 11"], max_length=16, cfg_scale=1.0)
    with pytest.raises(UsageError, match="block-length 8"):
        generator.generate(["10 11"], max_length=16, block_length=8)


def test_the_left_to_right_order_commits_the_leftmost_masks():
    from textdiffusion.core.sampler import DenoisingSampler, DenoisingState

    sampler = DenoisingSampler(SamplerConfig(strategy="left-to-right", steps=3, sampling="greedy"), MASK)
    x = torch.tensor([[BOS, 7] + [MASK] * 6])
    editable = x == MASK
    sampler.set_timesteps(3, editable)
    state = DenoisingState(x=x, editable=editable, generators=[torch.Generator().manual_seed(0)])
    logits = torch.randn(1, 8, V)
    after = sampler.step(logits, state).x
    assert (after[0, 2:4] != MASK).all() and (after[0, 4:] == MASK).all()


def test_adapter_save_and_load_give_the_same_logits(tmp_path):
    from peft import PeftModel

    denoiser = adapted()
    denoiser.model.save_pretrained(tmp_path / "adapter")
    again = BlockDiffusionLM(PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter"), B).eval()
    clean = clean_rows()
    x_t = BlockCorruption(MASK, PAD, B, seed=2)([{"input_ids": r} for r in clean])["input_ids"][::2]
    with torch.no_grad():
        before = denoiser(input_ids=x_t, clean_ids=clean).logits
        assert torch.allclose(before, again(input_ids=x_t, clean_ids=clean).logits, atol=1e-6)
        from textdiffusion.models.block import merge_trainable_tokens

        merge_trainable_tokens(again.model)  # what loading for inference does: the same logits, computed faster
        assert torch.allclose(before, again(input_ids=x_t, clean_ids=clean).logits, atol=1e-5)


def left_to_right_step(logits: torch.Tensor) -> list[int]:
    """One left-to-right step at threshold 0.5 (greedy) on ``[BOS, 7, mask x 4]``: the tokens after it."""
    from textdiffusion.core.sampler import DenoisingSampler, DenoisingState

    sampler = DenoisingSampler(SamplerConfig(strategy="left-to-right", confidence_threshold=0.5, sampling="greedy"),
                               MASK)
    x = torch.tensor([[BOS, 7] + [MASK] * 4])
    editable = x == MASK
    sampler.set_timesteps(4, editable)
    state = DenoisingState(x=x, editable=editable, generators=[torch.Generator().manual_seed(0)])
    return sampler.step(logits, state).x[0].tolist()


def test_left_to_right_with_a_threshold_commits_a_run_from_the_left():
    logits = torch.full((1, 6, V), -20.0)
    for pos, (tok, sure) in enumerate([(10, True), (11, False), (12, True), (13, True)], start=2):
        if not sure:
            logits[0, pos] = 0.0  # a flat distribution with a small bump: p(11) about 0.03
        logits[0, pos, tok] = 20.0 if sure else 0.5
    after = left_to_right_step(logits)
    assert after[2] == 10 and after[3] == MASK and after[4] == MASK and after[5] == MASK  # stops at the unsure one


def test_the_left_to_right_run_stops_at_the_same_token_twice():
    logits = torch.full((1, 6, V), -20.0)
    for pos, tok in enumerate([10, 10, 12, 13], start=2):  # every one sure, the second the same as the first
        logits[0, pos, tok] = 20.0
    assert left_to_right_step(logits)[2:] == [10, MASK, MASK, MASK]
