"""Block diffusion of a masked LM (issue 34, models/block.EncoderBlockDiffusionLM): the one-forward training pass
over [x_t ; x_0] with positions and sliding windows built from positions, the exact block cache of
models/kvcache.py that decodes it, train/eval/generate end to end on the micro preset, and
`experiment block-sizes` as a smoke run — on a random two-layer ModernBERT where the weights do not matter."""

import json

import pytest
import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from textdiffusion.cli.main import main
from textdiffusion.models.block import BlockCorruption, EncoderBlockDiffusionLM, block_index, encoder_block_mask
from textdiffusion.models.kvcache import DenoisingKVCache

V, MASK, PAD = 80, 4, 1


def tiny_modernbert(seed: int = 0) -> ModernBertForMaskedLM:
    """Two layers, one with a window of +-2 (as the presets' local layers), weights drawn wide enough to matter."""
    torch.manual_seed(seed)
    config = ModernBertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, layer_types=["sliding_attention", "full_attention"],
                              local_attention=4, max_position_embeddings=128, pad_token_id=PAD,
                              initializer_range=0.2)
    config._attn_implementation = "sdpa"
    return ModernBertForMaskedLM(config).eval()


def rows(b: int, l: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, V, (b, l), generator=torch.Generator().manual_seed(seed))


def block_causal(model, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """The reference: a plain forward of ``ids`` with block-causal attention (and the window) over one copy."""
    b = block_index(ids.shape[1], block_size)
    full = (b[None, :] <= b[:, None])[None, None].expand(len(ids), 1, -1, -1)
    pos = torch.arange(ids.shape[1])
    near = (pos[:, None] - pos[None, :]).abs() <= model.config.sliding_window
    return model.base_model(input_ids=ids, attention_mask={"full_attention": full, "sliding_attention": full & near}
                            ).last_hidden_state


@torch.no_grad()
def test_one_block_is_the_plain_masked_lm_and_each_block_sees_only_the_clean_blocks_before_it():
    model = tiny_modernbert()
    x0 = rows(2, 16)
    xt = x0.clone()
    xt[:, ::3] = MASK
    whole = EncoderBlockDiffusionLM(model, 16).block_hidden(xt, x0)  # one block: the noisy copy sees only itself
    torch.testing.assert_close(whole, model.base_model(input_ids=xt).last_hidden_state, atol=1e-5, rtol=1e-5)
    hidden = EncoderBlockDiffusionLM(model, 4).block_hidden(xt, x0)
    for k in range(4):  # block k == a forward of [clean blocks < k ; noisy block k], positions and windows included
        reference = block_causal(model, torch.cat([x0[:, :4 * k], xt[:, 4 * k:4 * k + 4]], 1), 4)[:, 4 * k:]
        torch.testing.assert_close(hidden[:, 4 * k:4 * k + 4], reference, atol=1e-5, rtol=1e-5)
    # a window made from indices into the doubled sequence would let the noisy copy's last tokens see the
    # clean copy's first ones; the mask it gets must not
    mask = encoder_block_mask(8, 4, torch.ones(1, 8, dtype=torch.bool))[0, 0]
    assert not mask[:4, 8:].any() and mask[4:8, 8:12].all() and not mask[4:8, 12:].any()  # noisy rows, clean keys
    assert not mask[8:, :8].any() and mask[12:, 8:].all() and not mask[8:12, 12:].any()  # clean rows


@torch.no_grad()
def test_the_block_cache_gives_the_training_forwards_logits_at_every_step_with_rows_at_their_own_pace():
    model = tiny_modernbert(1)
    denoiser = EncoderBlockDiffusionLM(model, 4)
    l, x0 = 24, rows(3, 24, 1)
    cache = DenoisingKVCache(denoiser, "block", block_size=4)
    cache.add_rows(3, l, "cpu")
    attention = torch.ones(3, l, dtype=torch.long)
    first = torch.tensor([1, 1, 2])  # row 2 has a longer prompt: its blocks are one behind
    for k in range(1, 5):
        region = torch.zeros(3, l, dtype=torch.bool)
        x = x0.clone()
        for r in range(3):
            start = 4 * (k + int(first[r]) - 1)
            region[r, start:start + 4] = True
            x[r, start:] = MASK
        for _ in range(3):  # commit one token of each block per step, left to right
            positions = (x == MASK) & region
            got = cache.logits(x, attention, region, positions)
            want = denoiser(input_ids=x, clean_ids=torch.where(x == MASK, x0, x), masked_positions=positions)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            left = torch.where(positions, torch.arange(l), l).min(1).values
            x[torch.arange(3), left] = x0[torch.arange(3), left]
    assert cache.partial_rows == 3 * 4 * 3


def test_complementary_pairs_mask_every_maskable_token_once_and_keep_the_prompt_prefix():
    corruption = BlockCorruption(MASK, PAD, 4, protected_token_ids=(0, 2), clean_prefix=5, seed=3)
    clean = rows(6, 16, 3)
    clean[:, 0], clean[:, -1] = 0, 2
    batch = corruption([{"input_ids": r} for r in clean])
    masked = (batch["input_ids"] == MASK).view(6, 2, 16)
    maskable = corruption.maskable(clean)
    assert torch.equal(masked.sum(1), maskable.long())  # each maskable token in exactly one copy
    assert not masked[:, :, :5].any() and not maskable[:, -1].any()


@pytest.fixture(scope="module")
def micro_runs(tmp_path_factory, wiki):
    """(corpus, an MDLM micro checkpoint, a micro AR with the same tokenizer, a block-of-4 run from the MDLM)."""
    root = tmp_path_factory.mktemp("block_encoder")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in wiki.train[:300]))
    common = ["--dataset", str(docs), "--preset", "micro", "--max-length", "32", "--batch-size", "8",
              "--eval-blocks", "8", "--logging-steps", "10", "--learning-rate", "3e-3"]
    assert main(["train", *common, "--max-steps", "30", "--eval-steps", "30", "--output-dir", str(root / "mdlm")]) == 0
    assert main(["train", *common, "--objective", "ar", "--max-steps", "30", "--eval-steps", "30",
                 "--output-dir", str(root / "ar")]) == 0
    assert main(["train", "--model-name", str(root / "mdlm"), "--block-size", "4", "--dataset", str(docs),
                 "--max-length", "32", "--batch-size", "8", "--eval-blocks", "8", "--max-steps", "12",
                 "--eval-steps", "6", "--logging-steps", "6", "--output-dir", str(root / "b4")]) == 0
    return docs, root / "mdlm", root / "ar", root / "b4"


def test_train_eval_and_generate_a_block_model_from_a_masked_diffusion_model(micro_runs, capsys, tmp_path):
    from textdiffusion.pipelines.generation import DiffusionGenerator

    docs, _, _, b4 = micro_runs
    settings = json.loads((b4 / "diffusion_config.json").read_text())
    assert settings["block_size"] == 4 and not settings["adapted_from_causal"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(b4), "--dataset", str(docs), "--eval-blocks", "8",
                 "--output-dir", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "block NELBO" in out and "blocks of 4" in out and "first 5 tokens are given" in out
    g = DiffusionGenerator.from_pretrained(str(b4), device="cpu")
    prompts = ["The river", "A number of"]
    kwargs = dict(strategy="left-to-right", steps=12, sampling="greedy", stop_at_eos=False)
    together = g.generate(templates=[f"{p}<mask:12>" for p in prompts], seed=0, **kwargs)
    alone = [g.generate(templates=[f"{p}<mask:12>"], seed=0, **kwargs) for p in prompts]
    assert together.texts == [a.texts[0] for a in alone]  # rows of different lengths move at their own pace
    threshold = g.generate(templates=[f"{prompts[0]}<mask:12>"], seed=0, strategy="left-to-right", steps=12,
                           confidence_threshold=0.01, stop_at_eos=False)
    assert threshold.nfe < 12  # a low threshold commits several tokens of a block per call


@pytest.mark.parametrize("argv, named", [
    (["--lora-r", "4"], "--lora-r"),  # adapters are for a causal LM's block model
    (["--objective", "ar"], "--block-size"),
    (["--max-length", "30"], "--block-size"),
])
def test_bad_block_settings_are_one_line(argv, named, capsys, small_jsonl, tmp_path):
    code = main(["train", "--preset", "micro", "--block-size", "4", "--dataset", str(small_jsonl), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_block_sizes_experiment_trains_resumes_and_compares(micro_runs, tmp_path, capsys):
    docs, mdlm, ar, _ = micro_runs
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: {docs}\nmax_length: 32\nbatch_size: 4\nmax_steps: 4\neval_steps: 2\neval_blocks: 4\n"
                      "logging_steps: 2\nlearning_rate: 0.001\n")
    argv = ["experiment", "block-sizes", "--checkpoint", str(mdlm), "--ar-checkpoint", str(ar), "--dataset", str(docs),
            "--recipe", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--block-sizes", "4", "16",
            "--workers", "2", "--test-blocks", "4", "--nelbo-samples", "1", "--num-prompts", "2", "--new-tokens", "8",
            "--thresholds", "0.5", "--speed-batches", "1", "--scorer", "none", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    kinds = [r["kind"] for r in result["likelihood"]]
    assert kinds == ["MDLM bound", "block NELBO", "block NELBO", "exact NLL"]
    assert len({r["tokens"] for r in result["likelihood"]}) == 1  # the same tokens for every row
    settings = [r["setting"] for r in result["frontier"]]
    assert settings[0].startswith("AR") and "blocks of 16, threshold 0.5" in settings
    assert all(r["tokens_per_call"] >= 1.0 for r in result["frontier"])
    assert (tmp_path / "out" / "block_sizes.png").stat().st_size > 0
    assert "Goal" in (tmp_path / "out" / "results.md").read_text()
    # the runs are reused: a second invocation trains nothing more
    stamp = (tmp_path / "runs" / "b4" / "model.safetensors").stat().st_mtime
    assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "runs" / "b4" / "model.safetensors").stat().st_mtime == stamp
