import pytest
import torch

from textdiffusion.core.collator import IGNORE_INDEX, DiffusionCollator, collator_for_tokenizer


def make(tokenizer, **kw):
    return collator_for_tokenizer(tokenizer, **kw)


def test_blocks_are_packed_without_padding(blocks, tokenizer):
    assert blocks.shape[1] == 64
    assert not (blocks == tokenizer.pad_token_id).any()
    assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_mask_fraction_matches_rate(tokenizer, blocks, rate):
    c = make(tokenizer, mask_probs=(rate,), seed=1)
    batch = c(list(blocks))
    masked = batch["labels"] != IGNORE_INDEX
    maskable = c.maskable(blocks, torch.full((len(blocks),), c.prefix_length))
    frac = masked.sum().item() / maskable.sum().item()
    assert abs(frac - rate) < 0.03, (rate, frac)
    assert torch.all(batch["mask_rate"] == rate)


def test_prefix_special_tokens_and_padding_are_never_masked(tokenizer, blocks):
    rows = [blocks[0], blocks[1][:40]]  # the short row gets padded
    c = make(tokenizer, mask_probs=(1.0,), prefix_length=5, seed=0)
    batch = c(rows)
    masked = batch["labels"] != IGNORE_INDEX
    assert not masked[:, :5].any()
    special = torch.isin(c.pad(rows), torch.tensor(tokenizer.all_special_ids))
    assert not (masked & special).any()
    assert (batch["attention_mask"][1, 40:] == 0).all() and not masked[1, 40:].any()
    # at rate 1.0 everything else is masked
    assert (masked == c.maskable(c.pad(rows), torch.tensor([5, 5]))).all()


def test_labels_are_ignore_exactly_where_not_masked(tokenizer, blocks):
    c = make(tokenizer, mask_per="example", seed=3)
    batch = c(list(blocks))
    masked = batch["input_ids"] == tokenizer.mask_token_id
    assert torch.equal(batch["labels"] != IGNORE_INDEX, masked)
    assert torch.equal(batch["labels"][masked], blocks[masked])
    assert torch.equal(batch["input_ids"][~masked], blocks[~masked])


def test_same_seed_same_batch_and_different_seed_differs(tokenizer, blocks):
    a = make(tokenizer, mask_per="example", seed=5)(list(blocks))
    b = make(tokenizer, mask_per="example", seed=5)(list(blocks))
    c = make(tokenizer, mask_per="example", seed=6)(list(blocks))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_per_batch_uses_one_level_and_per_example_many(tokenizer, blocks):
    per_batch = make(tokenizer, mask_per="batch", seed=0)(list(blocks))
    per_example = make(tokenizer, mask_per="example", seed=0)(list(blocks))
    assert per_batch["mask_rate"].unique().numel() == 1
    assert per_example["mask_rate"].unique().numel() > 3
    assert {round(r, 4) for r in per_example["mask_rate"].tolist()} <= {round(0.1 * i, 4) for i in range(1, 11)}


@pytest.mark.parametrize("sampling", ["uniform", "antithetic", "stratified"])
def test_continuous_time_rates_and_elbo_weights(tokenizer, blocks, sampling):
    c = make(tokenizer, time_sampling=sampling, mask_per="example", loss_weighting="elbo", seed=0)
    batch = c(list(blocks))
    rate = batch["mask_rate"]
    assert torch.all((rate > 0) & (rate <= 1))
    assert torch.allclose(batch["loss_weight"], 1.0 / rate, rtol=1e-5)  # linear schedule: t = rate
    if sampling != "uniform":  # low-discrepancy: one rate per 1/b stratum of [0, 1]
        b = len(rate)
        strata = torch.sort(((rate - c.t_min) / (1 - c.t_min) * b).floor().clamp(max=b - 1)).values
        assert torch.equal(strata, torch.arange(b, dtype=strata.dtype))


def test_no_weighting_gives_unit_weights(tokenizer, blocks):
    batch = make(tokenizer, time_sampling="uniform", loss_weighting="none")(list(blocks))
    assert torch.all(batch["loss_weight"] == 1)


def test_random_prefix_lengths_are_in_range_and_respected(tokenizer, blocks):
    c = make(tokenizer, mask_probs=(1.0,), mask_per="example", prefix_length=2, random_prefix_max=30, seed=0)
    g = torch.Generator().manual_seed(0)
    prefixes = c.prefix_lengths(1000, g)
    assert prefixes.min() >= 2 and prefixes.max() <= 30 and prefixes.unique().numel() > 20
    batch = c(list(blocks))
    first_masked = (batch["labels"] != IGNORE_INDEX).float().argmax(1)
    assert (first_masked >= 2).all() and first_masked.unique().numel() > 3


@pytest.mark.parametrize("kw, needle", [
    ({"mask_probs": (0.0, 0.5)}, "mask_probs"),
    ({"mask_probs": (1.5,)}, "1.5"),
    ({"time_sampling": "sideways"}, "sideways"),
    ({"mask_per": "token"}, "token"),
    ({"loss_weighting": "magic"}, "magic"),
    ({"prefix_length": -1}, "prefix_length"),
])
def test_bad_settings_name_the_value(kw, needle):
    with pytest.raises(ValueError, match=needle):
        DiffusionCollator(mask_token_id=4, pad_token_id=1, **kw)


def test_tokenizer_without_mask_token_is_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        collator_for_tokenizer(tok)


def test_continuous_time_is_per_example_with_the_default_flags(tokenizer, blocks):
    """--mask-per defaults to batch, which applies to the grid only: continuous t is drawn for every row."""
    from textdiffusion.pipelines.training_args import TrainArgs

    args = TrainArgs(time_sampling="antithetic")  # every other flag at its default (mask_per='batch')
    c = make(tokenizer, **{k: getattr(args, k) for k in ("time_sampling", "mask_per", "schedule", "t_min")}, seed=3)
    rate = c(list(blocks[:8]))["mask_rate"]
    assert len(set(rate.tolist())) == 8  # 8 rows, 8 distinct rates
    u = ((rate - c.t_min) / (1 - c.t_min)).sort().values  # antithetic: evenly spaced, 1/8 apart
    assert torch.allclose(u.diff(), torch.full((7,), 1 / 8), atol=1e-5)
    grid = make(tokenizer, time_sampling="grid", mask_per="batch", seed=3)(list(blocks[:8]))["mask_rate"]
    assert len(set(grid.tolist())) == 1  # the grid honours mask_per='batch'


def test_end_of_text_is_a_target_except_the_closing_separator(tokenizer, blocks):
    sep = tokenizer.sep_token_id
    learn = make(tokenizer, mask_probs=(1.0,), prefix_length=1, learn_eos=True, seed=0)
    batch = learn(list(blocks))
    interior = (blocks == sep)
    interior[:, -1] = False
    assert interior.any()
    masked = batch["labels"] != IGNORE_INDEX
    assert masked[interior].all()  # every document end is predicted at rate 1.0
    assert not masked[:, -1].any() and (batch["input_ids"][:, -1] == sep).all()  # the block's own end stays
    plain = make(tokenizer, mask_probs=(1.0,), prefix_length=1, seed=0)(list(blocks))
    assert not (plain["labels"] != IGNORE_INDEX)[interior].any()  # without learn_eos: conditioned on


def test_masks_depend_only_on_seed_and_batch_number(tokenizer, blocks):
    """What makes kill -9 + --resume exact: batch j's masks come from (seed, j), whatever came before."""
    rows = list(blocks[:8])
    a = make(tokenizer, seed=5)
    first = [a(rows)["input_ids"] for _ in range(4)]
    b = make(tokenizer, seed=5)
    b.reseed(5, batch_offset=2)
    assert torch.equal(b(rows)["input_ids"], first[2]) and torch.equal(b(rows)["input_ids"], first[3])
    assert not torch.equal(first[0], first[1])
