"""A causal LM adapted to diffusion (train --adapt-from-causal): shifted logits, attention annealed from
causal to full, a mask token chosen for a tokenizer without one, and the whole train -> generate path on a
two-layer Llama."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from textdiffusion.cli.main import main
from textdiffusion.config import DiffusionConfig
from textdiffusion.errors import UsageError
from textdiffusion.models.adapt import CausalDiffusionLM, choose_special_tokens
from textdiffusion.pipelines.trainers import AttentionAnnealCallback
from textdiffusion.pipelines.training_args import TrainArgs

L = 12
SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<empty_output>"]


def causal_tokenizer(texts, extra_specials=True):
    """A byte-level BPE laid out like SmolLM2's: bos <|im_start|>, eos = pad <|im_end|>, no mask token, and
    (``extra_specials``) unused special tokens after them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = SMOL_SPECIALS if extra_specials else SMOL_SPECIALS[:3]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>",
                                   additional_special_tokens=specials[3:])


def tiny_causal(kind="llama", vocab=512, attn="sdpa"):
    torch.manual_seed(0)
    size = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                tie_word_embeddings=True)
    config_type, model_type = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_type(**size)
    config._attn_implementation = attn
    return model_type(config).eval()


def save_tiny_causal(folder, texts):
    """A tiny Llama laid out like SmolLM2, saved with its tokenizer into ``folder``: a causal-LM folder as
    --model-name takes it. Returns the tokenizer."""
    tokenizer = causal_tokenizer(texts)
    tiny_causal(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def logit_dependence(denoiser, position: int) -> set[int]:
    """Input positions whose token changes the logits predicted for ``position``."""
    torch.manual_seed(1)
    ids = torch.randint(20, 500, (1, L))
    base = denoiser(input_ids=ids).logits[0, position]
    touched = set()
    for j in range(L):
        other = ids.clone()
        other[0, j] = (other[0, j] + 97) % 480 + 20
        if not torch.allclose(denoiser(input_ids=other).logits[0, position], base, atol=1e-6):
            touched.add(j)
    return touched


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa")])
def test_logits_are_shifted_and_attention_anneals_from_causal_to_full(kind, attn):
    denoiser = CausalDiffusionLM(tiny_causal(kind, attn=attn), anneal_steps=10).train()
    denoiser.set_step(0)  # anneal step 0: exactly the causal LM, its head read one position early
    for i in (1, 5, L - 1):
        assert logit_dependence(denoiser, i) == set(range(i))
    denoiser.set_step(10)  # annealed: every position sees the whole block
    for i in (1, 5, L - 1):
        assert logit_dependence(denoiser, i) == set(range(L))
    assert CausalDiffusionLM(denoiser.model).fresh().attention_ratio == 1.0  # what evaluation gets


def test_shifted_logits_are_the_causal_lms_next_token_logits_at_step_0():
    model = tiny_causal()
    denoiser = CausalDiffusionLM(model, anneal_steps=5).train()
    ids = torch.randint(20, 500, (2, L))
    with torch.no_grad():
        reference = model(input_ids=ids).logits  # [b, l, V]: position i predicts token i+1
        shifted = denoiser(input_ids=ids).logits
        positions = torch.zeros(2, L, dtype=torch.bool)
        positions[:, [3, 7]] = True
        gathered = denoiser(input_ids=ids, masked_positions=positions)  # [n, V]
    assert torch.allclose(shifted[:, 1:], reference[:, :-1], atol=1e-5)
    assert torch.allclose(gathered, reference[:, [2, 6]].flatten(0, 1), atol=1e-5)


def test_halfway_through_annealing_part_of_the_future_is_visible():
    denoiser = CausalDiffusionLM(tiny_causal(), anneal_steps=10).train()
    denoiser.set_step(5)
    torch.manual_seed(0)
    mask = denoiser.attention_mask_4d(torch.zeros(4, 64, dtype=torch.long), None)  # [b, 1, l, l]
    future = torch.ones(64, 64, dtype=torch.bool).triu(1)
    seen = mask[:, 0][:, future].float().mean()
    assert 0.45 < float(seen) < 0.55  # about half of the later keys
    assert bool(mask[:, 0][:, ~future].all())  # the past always
    padded = denoiser.attention_mask_4d(torch.zeros(1, 6, dtype=torch.long), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert not bool(padded[0, 0, :, 4:].any())  # padding keys never


def test_anneal_callback_follows_the_optimiser_step_and_defaults_to_a_tenth_of_the_run():
    denoiser = CausalDiffusionLM(tiny_causal(), anneal_steps=None).train()
    callback = AttentionAnnealCallback(denoiser)

    class State:
        max_steps, global_step, is_world_process_zero = 200, 0, False

    callback.on_train_begin(None, State, None)
    assert denoiser.anneal_steps == 20
    State.global_step = 10
    callback.on_step_begin(None, State, None)
    assert denoiser.attention_ratio == 0.5
    assert denoiser.eval().attention_ratio == 1.0  # evaluation always attends fully


def test_mask_token_reuses_an_unused_special_token_and_padding_is_not_end_of_text(wiki):
    tokenizer = causal_tokenizer(wiki.train[:200])
    model = tiny_causal(vocab=len(tokenizer))
    notes = choose_special_tokens(tokenizer, model)
    assert tokenizer.mask_token == "<empty_output>" and tokenizer.pad_token == "<file_sep>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 512  # no resize
    assert len(notes) == 2 and "reusing" in notes[0]


def test_a_tokenizer_without_unused_tokens_gets_new_ones_and_resized_embeddings(wiki, tmp_path):
    tokenizer = causal_tokenizer(wiki.train[:200], extra_specials=False)
    model = tiny_causal(vocab=len(tokenizer))
    old = model.get_input_embeddings().weight.detach().clone()
    choose_special_tokens(tokenizer, model)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer) == old.shape[0] + 2
    assert tokenizer.mask_token_id == old.shape[0] and torch.equal(weight[: old.shape[0]], old)
    assert model.get_output_embeddings().weight is weight  # still tied
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).mask_token_id == tokenizer.mask_token_id


def test_bad_inputs_are_one_line_usage_errors_naming_the_flag(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"--attention-anneal-steps must be >= 0 .*got -3\."):
        TrainArgs(adapt_from_causal=True, attention_anneal_steps=-3)
    with pytest.raises(UsageError, match="--attention-anneal-steps applies only with --adapt-from-causal"):
        TrainArgs(attention_anneal_steps=5)
    with pytest.raises(UsageError, match="--adapt-from-causal .*--preset"):
        TrainArgs(adapt_from_causal=True, preset="micro")
    masked = tmp_path / "masked"
    from textdiffusion.models.presets import build_preset_model, train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a b c d e f"] * 50, 300)
    build_preset_model("micro", tok, 64).save_pretrained(masked)
    tok.save_pretrained(masked)
    capsys.readouterr()
    code = main(["train", "--adapt-from-causal", "--model-name", str(masked), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--adapt-from-causal" in err and "--model-name" in err and "ModernBertForMaskedLM" in err
    assert not (tmp_path / "run").exists()


def test_the_checkpoint_records_adaptation_and_readers_rebuild_the_shifted_wrapper(tmp_path, wiki):
    from textdiffusion.pipelines.generation import DiffusionGenerator
    from textdiffusion.pipelines.objectives import objective_of_checkpoint

    tokenizer = causal_tokenizer(wiki.train[:200])
    model = tiny_causal(vocab=len(tokenizer))
    choose_special_tokens(tokenizer, model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert objective_of_checkpoint(str(tmp_path)).name == "ar"  # a plain causal LM: the AR path
    DiffusionConfig(max_length=24, mask_token_id=tokenizer.mask_token_id, adapted_from_causal=True).save_pretrained(tmp_path)
    assert objective_of_checkpoint(str(tmp_path)).name == "diffusion"
    generator = DiffusionGenerator.from_pretrained(str(tmp_path), device="cpu")
    assert type(generator.denoiser) is CausalDiffusionLM and generator.mask_id == tokenizer.mask_token_id
    out = generator.generate(["The"], steps=6, seed=0)
    assert out.token_ids.shape[1] == 24 and not (out.token_ids == generator.mask_id).any()
    legacy = {k: v for k, v in DiffusionConfig().to_dict().items() if k != "adapted_from_causal"}
    assert DiffusionConfig.from_dict(legacy).adapted_from_causal is False  # files written before the field
    with pytest.raises(ValueError, match="adapted_from_causal"):
        DiffusionConfig(objective="ar", adapted_from_causal=True)


@pytest.mark.slow
def test_train_adapt_from_causal_then_generate_and_eval(tmp_path, small_jsonl, wiki, capsys):
    """The real command on a tiny Llama saved in tmp: a few steps, then generate and eval rebuild the wrapper."""
    base = tmp_path / "tiny-llama"
    tokenizer = save_tiny_causal(base, wiki.train[:300])
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "textdiffusion", "train", "--adapt-from-causal", "--model-name", str(base),
           "--dataset", str(small_jsonl), "--max-length", "32", "--batch-size", "4", "--max-steps", "6",
           "--attention-anneal-steps", "4", "--eval-steps", "6", "--eval-blocks", "4", "--logging-steps", "2",
           "--learning-rate", "1e-3", "--precision", "fp32", "--output-dir", str(run)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mask token: reusing the unused special token '<empty_output>'" in out.stdout
    assert "full from step 4" in out.stdout
    config = json.loads((run / "diffusion_config.json").read_text())
    assert config["adapted_from_causal"] is True and config["mask_token_id"] == tokenizer.convert_tokens_to_ids("<empty_output>")
    assert json.loads((run / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert DiffusionConfig.from_pretrained(run).adapted_from_causal
    levels = (run / "per_level_loss.csv").read_text().splitlines()
    assert len(levels) > 2  # step 0 and step 6

    from textdiffusion.pipelines.generation import DiffusionGenerator
    from textdiffusion.pipelines.objectives import objective_of_checkpoint

    assert objective_of_checkpoint(str(run)).name == "diffusion"  # not the AR baseline, though it is a LlamaForCausalLM
    generator = DiffusionGenerator.from_pretrained(str(run), device="cpu")
    assert isinstance(generator.denoiser, CausalDiffusionLM) and generator.denoiser.attention_ratio == 1.0
    result = generator.generate(["The river"], max_length=24, steps=8, seed=0)
    assert not (result.token_ids == generator.mask_id).any()  # every mask filled
    assert result.texts[0].startswith("The river")

    assert main(["generate", "--checkpoint", str(run), "--prefix", "The", "--max-length", "20", "--steps", "4",
                 "--hide-steps"]) == 0
    assert "[sample 0] The" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run), "--dataset", str(small_jsonl), "--eval-blocks", "4",
                 "--samples-per-block", "1", "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["objective"] == "diffusion" and report["nelbo"][0]["nats_per_token"] > 0
    # the evaluation inside training (a fresh wrapper: full attention) and `eval` of the saved model agree
    header, *rows = [line.split(",") for line in levels]
    at_end = {row[1]: float(row[2]) for row in rows if row[0] == "6"}
    for level in report["per_level"]:
        assert level["loss"] == pytest.approx(at_end[f"{level['mask_rate']:.2f}"], abs=2e-4)
