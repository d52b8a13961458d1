"""Heads for encoders shipped without one: detected from the load report, built useful at step 0 (tied decoder,
near-identity transform, log-unigram bias), warmed up with the encoder frozen; and --keep-layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from mpnet_helpers import save_headless_mpnet

from textdiffusion.cli.main import main
from textdiffusion.core.collator import collator_for_tokenizer
from textdiffusion.core.data import pack, unigram_cross_entropy
from textdiffusion.core.evaluation import per_level_loss
from textdiffusion.errors import UsageError
from textdiffusion.models.bundled import resolve_checkpoint
from textdiffusion.models.heads import build_head, head_transform, warm_up_head
from textdiffusion.models.loading import keep_first_layers, load_masked_lm


@pytest.fixture(scope="module")
def headless(tmp_path_factory, wiki):
    return save_headless_mpnet(tmp_path_factory.mktemp("mpnet") / "model", wiki.train[:300])


@pytest.fixture(scope="module")
def data(headless, wiki):
    tokenizer, _ = load_masked_lm(str(headless))
    train = pack(wiki.train[:150], tokenizer, 64)
    val = pack(wiki.validation[:30], tokenizer, 64)
    return tokenizer, train, val


def fresh(headless):
    torch.manual_seed(1)
    return load_masked_lm(str(headless))[1]


def test_missing_head_is_detected_from_the_load_report(headless):
    model = fresh(headless)
    assert {"lm_head.dense.weight", "lm_head.layer_norm.weight", "lm_head.bias"} <= set(model.missing_head_keys)
    assert load_masked_lm(resolve_checkpoint("wiki-small"))[1].missing_head_keys == []  # a complete model


def test_a_dropped_head_loads_quietly_and_other_missing_weights_are_named(headless, tmp_path, capfd, caplog):
    fresh(headless)
    assert "LOAD REPORT" not in capfd.readouterr().err  # the head is built by train, not a page of MISSING rows
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(headless, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(k for k in weights if "intermediate.dense.weight" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, broken / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="textdiffusion.models.loading"):
        load_masked_lm(str(broken))
    assert "1 weight(s) missing" in caplog.text and "intermediate.dense.weight" in caplog.text


def test_built_head_beats_the_random_head_at_step_0(headless, data):
    """On real text, with an untrained encoder: the built head's loss is near the unigram cross-entropy at
    every level (the bias carries it), the random head's near log V."""
    tokenizer, train, val = data
    collator = collator_for_tokenizer(tokenizer)
    random_head = per_level_loss(fresh(headless), val, collator, levels=(0.5, 1.0))
    model = fresh(headless)
    fit = build_head(model, train, tokenizer)
    built = per_level_loss(model, val, collator, levels=(0.5, 1.0))
    unigram = unigram_cross_entropy(train, val, list(tokenizer.all_special_ids))
    log_v = math.log(len(tokenizer))
    for r, b in zip(random_head, built):
        assert r.loss > log_v - 0.5  # a random head knows nothing
        assert b.loss < r.loss - 0.5, (b.loss, r.loss, unigram)
        assert b.loss < unigram + 0.25, (b.loss, unigram)
    assert fit["built_head_loss"] < fit["random_head_loss"]
    assert model.lm_head.decoder.weight is model.get_input_embeddings().weight  # tied


def test_transform_is_near_identity_up_to_scale(headless, data):
    tokenizer, train, _ = data
    model = fresh(headless).eval()
    fit = build_head(model, train, tokenizer)
    with torch.no_grad():
        h = model.base_model(input_ids=train[:4]).last_hidden_state.flatten(0, 1)  # [n, d]
        out = head_transform(model, h) / fit["logit_scale"]
    assert F.cosine_similarity(out, h, dim=-1).min() > 0.99
    assert torch.allclose(out.norm(dim=-1), h.norm(dim=-1), rtol=0.1)


def test_head_warmup_trains_the_head_only(headless, data):
    tokenizer, train, _ = data
    model = fresh(headless)  # the random head: far from its optimum, so the warm-up must move it
    encoder = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    head = {k: v.clone() for k, v in model.lm_head.state_dict().items()}
    losses = warm_up_head(model, train, collator_for_tokenizer(tokenizer), steps=30, batch_size=8, learning_rate=3e-2)
    assert all(torch.equal(v, model.base_model.state_dict()[k]) for k, v in encoder.items())
    changed = [k for k, v in model.lm_head.state_dict().items() if k != "decoder.weight" and not torch.equal(v, head[k])]
    assert "dense.weight" in changed and "bias" in changed
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert all(p.grad is None for p in model.parameters())


def test_bert_head_is_built_too(data):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer, train, val = data
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    fit = build_head(model, train, tokenizer)
    assert fit["built_head_loss"] < fit["random_head_loss"] - 0.5


def test_keep_first_layers(headless):
    model = keep_first_layers(fresh(headless), 1)
    assert len(model.base_model.encoder.layer) == 1 and model.config.num_hidden_layers == 1
    with pytest.raises(UsageError, match="--keep-layers must be between 1 and the model's 1 layers, got 3"):
        keep_first_layers(model, 3)


@pytest.mark.parametrize("extra", [["--head-init", "zero"], ["--head-warmup", "-1"], ["--keep-layers", "2", "--preset", "micro"]])
def test_bad_head_flags_exit_2(tmp_path, extra, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "out"), *extra]) == 2
    assert "--head" in capsys.readouterr().err or "--keep-layers" in extra
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_builds_and_warms_the_head(headless, small_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model-name", str(headless), "--dataset", str(small_jsonl), "--output-dir", str(out),
                 "--max-length", "64", "--batch-size", "8", "--max-steps", "4", "--eval-steps", "4",
                 "--eval-blocks", "8", "--head-warmup", "5", "--keep-layers", "1", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "built one" in printed and "head warm-up: 5 steps" in printed
    tokenizer, model = load_masked_lm(str(out))
    assert model.missing_head_keys == [] and model.config.num_hidden_layers == 1
    assert model.lm_head.bias.std() > 0.5  # the built log-unigram bias was saved with the model (tied to the decoder's)
