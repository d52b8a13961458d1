"""A faithful re-implementation of the original generator, kept only as the speed baseline.

The original tool generated one sample at a time and, at each step, looped in Python over the masked
positions to sample each token, then over a random subset of the generated positions to re-mask them
("remask-random"). `textdiffusion generate --strategy remask-random` is the same algorithm, vectorised.
"""

from __future__ import annotations

import random

import torch

from textdiffusion.schedules import get_schedule


@torch.no_grad()
def generate_original(model, tokenizer, prefix: str, max_length: int = 128, steps: int = 10, schedule: str = "linear",
                      sampling: str = "topk", temperature: float = 1.0, top_k: int = 50, top_p: float = 0.9,
                      seed: int = 0, return_ids: bool = False):
    random.seed(seed)
    torch.manual_seed(seed)
    mask_id = tokenizer.mask_token_id
    prompt = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = [tokenizer.cls_token_id] + prompt + [mask_id] * (max_length - len(prompt) - 2) + [tokenizer.sep_token_id]
    generated = [i for i, t in enumerate(ids) if t == mask_id]
    x = torch.tensor([ids])
    ratio = get_schedule(schedule).mask_ratio
    # special tokens are never sampled: the original's models gave them no probability (it never trained
    # on them); a model that learned end-of-text would otherwise write it inside this fixed-length text
    never = [i for i in tokenizer.all_special_ids if i is not None]
    for step in range(steps):
        logits = model(input_ids=x).logits[0]
        mask_positions = (x[0] == mask_id).nonzero().flatten().tolist()
        for pos in mask_positions:  # the per-position Python loop of the original
            scores = logits[pos] / temperature
            scores[never] = -float("inf")  # the mask token among them
            if sampling == "greedy":
                token = int(scores.argmax())
            else:
                if sampling == "topk":
                    values, indices = scores.topk(top_k)
                    probs = values.softmax(-1)
                    token = int(indices[torch.multinomial(probs, 1)])
                else:  # nucleus
                    sorted_scores, indices = scores.sort(descending=True)
                    probs = sorted_scores.softmax(-1)
                    keep = probs.cumsum(-1) - probs <= top_p
                    probs = probs * keep
                    token = int(indices[torch.multinomial(probs / probs.sum(), 1)])
            x[0, pos] = token
        n_mask = int(round(float(ratio(torch.tensor(1.0 - (step + 1) / steps))) * len(generated)))
        for pos in random.sample(generated, n_mask):  # re-mask a random subset of the generated positions
            x[0, pos] = mask_id
    if return_ids:  # the generated positions only, for scoring
        return x[0, generated].tolist()
    return tokenizer.decode(x[0], skip_special_tokens=True)
