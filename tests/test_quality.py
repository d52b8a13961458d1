"""Fixed-length continuations, as the quality benchmarks compare them with the AR side's min_new_tokens."""

import torch

from textdiffusion.models.quality import PromptSet, diffusion_continuations
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
