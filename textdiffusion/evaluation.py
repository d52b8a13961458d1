"""What the model has learned: masked-token loss and accuracy at each corruption level.

A diffusion LM must denoise at every level, so one validation loss hides too much: a model can be good
at 15% masking and useless at 90%. ``per_level_loss`` masks the same validation blocks at 0.1 ... 1.0 with
a fixed seed (so numbers from different evaluations and checkpoints are comparable) and reports the
cross-entropy and top-1 accuracy of the masked tokens at each level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collator import DEFAULT_MASK_PROBS, DiffusionCollator
import torch.nn.functional as F

from .objective import masked_predictions


@dataclass
class LevelResult:
    mask_rate: float
    loss: float
    accuracy: float
    tokens: int


@torch.inference_mode()
def per_level_loss(model, blocks: torch.Tensor, collator: DiffusionCollator,
                   levels=DEFAULT_MASK_PROBS, batch_size: int = 32, seed: int = 1234) -> list[LevelResult]:
    """Masked-token cross-entropy (nats) and accuracy at each mask rate in ``levels``.

    ``collator`` supplies the token ids and the protection rules (prefix, special tokens); its own
    sampling settings are ignored: each level masks every maskable token with probability = level.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = []
    for level in levels:
        fixed = DiffusionCollator(
            mask_token_id=collator.mask_token_id, pad_token_id=collator.pad_token_id,
            protected_token_ids=collator.protected_token_ids, time_sampling="grid", mask_probs=(level,),
            prefix_length=collator.prefix_length, seed=seed)
        total, correct, count = 0.0, 0, 0
        for start in range(0, blocks.shape[0], batch_size):
            batch = fixed(blocks[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, targets, _ = masked_predictions(model, batch)
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
        results.append(LevelResult(level, total / max(count, 1), correct / max(count, 1), count))
    model.train(was_training)
    return results
