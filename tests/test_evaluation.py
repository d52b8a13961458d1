"""The per-level loss and the NELBO bound against direct, brute-force computations on a tiny model."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from textdiffusion.core.collator import DiffusionCollator
from textdiffusion.core.evaluation import nelbo, per_level_loss
from textdiffusion.models.presets import build_preset_model

MASK, PAD, CLS, SEP = 4, 1, 0, 2


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    return build_preset_model("micro", tokenizer, 16).eval()


def collator(prefix=1):
    return DiffusionCollator(mask_token_id=MASK, pad_token_id=PAD, protected_token_ids=[CLS, SEP], prefix_length=prefix)


def test_per_level_loss_matches_a_direct_computation(tiny, blocks):
    data = blocks[:6, :32].clone()
    results = per_level_loss(tiny, data, collator(prefix=5), levels=(0.3, 0.8), batch_size=4, seed=9)
    for r in results:
        masked_batch = DiffusionCollator(mask_token_id=MASK, pad_token_id=PAD, protected_token_ids=[CLS, SEP],
                                         mask_probs=(r.mask_rate,), prefix_length=5, seed=9)
        # the same masks, computed batch by batch as per_level_loss does
        total, count = 0.0, 0
        for start in range(0, len(data), 4):
            b = masked_batch(data[start:start + 4])
            with torch.no_grad():
                logits = tiny(input_ids=b["input_ids"]).logits
            ce = F.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="sum", ignore_index=-100)
            total += float(ce)
            count += int((b["labels"] != -100).sum())
        assert r.loss == pytest.approx(total / count, rel=1e-5)
        assert r.tokens == count


def brute_force_nelbo(model, row: torch.Tensor, maskable: torch.Tensor) -> float:
    """sum over k of (1/k) * average over all |M| = k subsets of sum_{i in M} CE_i; per maskable token."""
    positions = maskable.nonzero().flatten().tolist()
    L = len(positions)
    total = 0.0
    for k in range(1, L + 1):
        subsets = list(itertools.combinations(positions, k))
        acc = 0.0
        for subset in subsets:
            x = row.clone()
            x[list(subset)] = MASK
            logp = model(input_ids=x[None]).logits[0].log_softmax(-1)
            acc += -sum(float(logp[i, row[i]]) for i in subset)
        total += acc / len(subsets) / k
    return total / L


def test_nelbo_estimators_agree_with_brute_force(tiny):
    torch.manual_seed(1)
    rows = torch.randint(10, 200, (3, 7))
    rows[:, 0], rows[:, -1] = CLS, SEP  # 5 maskable tokens after the protected <s>
    c = collator(prefix=1)
    maskable = c.maskable(rows, torch.ones(3, dtype=torch.long))
    with torch.no_grad():
        exact = sum(brute_force_nelbo(tiny, r, m) for r, m in zip(rows, maskable)) / 3
    k_est = nelbo(tiny, rows, c, estimator="exact-k", samples_per_block=400, seed=0)
    t_est = nelbo(tiny, rows, c, estimator="continuous", samples_per_block=2000, seed=0)
    assert k_est.tokens == 15
    assert k_est.nats_per_token == pytest.approx(exact, rel=0.01)
    assert t_est.nats_per_token == pytest.approx(exact, rel=0.03)
    assert k_est.perplexity_bound == pytest.approx(math.exp(k_est.nats_per_token))
    assert k_est.bits_per_token == pytest.approx(k_est.nats_per_token / math.log(2))


@pytest.mark.parametrize("prefix", [0, 5])
def test_ar_and_diffusion_evaluations_score_the_same_tokens(tokenizer, blocks, prefix):
    """The AR baseline's exact NLL (`scored_positions`) and the NELBO (the evaluation collator's maskable set)
    must count the same tokens, or their per-token numbers would not compare: padded blocks, separators and
    the protected prefix included."""
    from textdiffusion.config import CorruptionConfig
    from textdiffusion.core.collator import collator_from_config
    from textdiffusion.core.evaluation import scored_positions

    padded = blocks.clone()
    padded[:3, -10:] = tokenizer.pad_token_id  # short last blocks end in padding
    config = CorruptionConfig(prefix_length=prefix, learn_eos=True)  # eval conditions on end-of-text all the same
    maskable = collator_from_config(tokenizer, config, training=False).maskable(padded, torch.full((len(padded),), prefix))
    scored = scored_positions(padded, tokenizer, prefix)
    assert (padded == tokenizer.sep_token_id).any() and torch.equal(maskable, scored)
