"""The masked-positions-only head must give exactly the loss of the model's own forward with labels."""

import pytest
import torch

from textdiffusion.core.architectures import masked_lm_head
from textdiffusion.core.collator import DiffusionCollator
from textdiffusion.core.loss import diffusion_loss

V = 300


def tiny_model(kind):
    import transformers as tf

    common = dict(vocab_size=V, pad_token_id=1)
    if kind == "roberta":
        cfg = tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=80, **common)
        return tf.RobertaForMaskedLM(cfg)
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **common)
        return tf.BertForMaskedLM(cfg)
    if kind == "distilbert":
        cfg = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **common)
        return tf.DistilBertForMaskedLM(cfg)
    cfg = tf.ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2, **common)
    return tf.ModernBertForMaskedLM(cfg)


@pytest.mark.parametrize("kind", ["roberta", "bert", "distilbert", "modernbert"])
def test_masked_only_head_equals_full_forward_loss(kind):
    torch.manual_seed(0)
    model = tiny_model(kind).eval()
    assert masked_lm_head(model) is not None
    ids = torch.randint(5, V, (4, 48))
    ids[:, 0] = 0
    batch = DiffusionCollator(mask_token_id=4, pad_token_id=1, protected_token_ids=[0, 2], mask_probs=(0.3,), seed=0)(ids)
    ours = diffusion_loss(model, batch)
    reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)


def test_elbo_loss_is_weighted_sum_over_maskable_tokens():
    torch.manual_seed(0)
    model = tiny_model("modernbert").eval()
    ids = torch.randint(5, V, (3, 40))
    c = DiffusionCollator(mask_token_id=4, pad_token_id=1, time_sampling="uniform", mask_per="example",
                          loss_weighting="elbo", seed=1)
    batch = c(ids)
    logits = model(input_ids=batch["input_ids"]).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none", ignore_index=-100)
    expected = (ce * batch["loss_weight"][:, None]).sum() / batch["num_maskable"].sum()
    assert torch.allclose(diffusion_loss(model, batch, "elbo"), expected, atol=1e-5)


def test_nothing_masked_gives_zero_loss_with_a_graph():
    model = tiny_model("roberta")
    ids = torch.randint(5, V, (2, 16))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, -100), "attention_mask": torch.ones_like(ids)}
    loss = diffusion_loss(model, batch)
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("weighting", ["none", "elbo"])
@pytest.mark.parametrize("kind", ["roberta", "modernbert"])
def test_static_shape_gather_gives_the_same_loss_and_gradients(kind, weighting):
    """`train --compile` pads the masked positions to a bucket size; the loss and gradients must not change."""
    from textdiffusion.core.collator import bucketed_index
    from textdiffusion.core.denoiser import MaskedDiffusionLM

    torch.manual_seed(0)
    model = MaskedDiffusionLM(tiny_model(kind).eval())
    ids = torch.randint(5, V, (4, 48))
    ids[:, 0] = 0
    collate = dict(mask_token_id=4, pad_token_id=1, protected_token_ids=[0, 2], time_sampling="uniform",
                   loss_weighting=weighting, seed=3)
    plain = DiffusionCollator(**collate)(ids)
    bucketed = DiffusionCollator(**collate, gather_buckets=8)(ids)
    assert torch.equal(plain["input_ids"], bucketed["input_ids"])
    n = int((plain["labels"] != -100).sum())
    size = bucketed["masked_index"].numel()
    assert size % 24 == 0 and n <= size < n + 24  # 4*48/8 = 24 per bucket step
    losses, grads = [], []
    for batch in (plain, bucketed):
        model.zero_grad()
        loss = diffusion_loss(model, batch, weighting)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    index, targets = bucketed_index(torch.full((2, 8), -100), 4)
    assert index.numel() == 4 and bool((targets == -100).all())  # nothing masked: one bucket of padding
