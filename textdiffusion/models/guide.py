"""The guide of classifier guidance: a small classifier of *partially masked* text, p(y | x_t).

    guide = NoisyClassifier.load("runs/topics-guide")        # trained by `textdiffusion train-guide`
    guide.check_tokenizer(generator.tokenizer, "wiki-small-topics")
    log_p = guide.log_probs(x, attention)                   # [b, C] at any step of a denoising run

It is trained on what the denoiser sees during generation: blocks in the checkpoint's layout, masked at a
random level per example by the project's collator (``core/collator.py``), so it can judge x_t at every
step, from all-masked (chance) to clean text.

**A small separate encoder, not a head on the diffusion model's encoder.** Three reasons:

* guidance differentiates the classifier with respect to its input at every step; through a ``micro`` or
  ``mini`` preset that backward pass costs a fraction of one denoiser forward, whereas a head on the
  denoiser's encoder would add the denoiser's own backward pass (and could not reuse its key/value cache,
  which only holds the positions outside the current block);
* the checkpoint stays as it was: a guide is trained in minutes beside it, several guides (topics,
  sentiment) can steer the same model, and one guide serves every checkpoint with the same tokenizer;
* it steers an unlabelled model as well as a labelled one: p(y | x_t) is learned apart from p(x)
  (the setting of Nisonoff et al. 2024, "Unlocking Guidance for Discrete State-Space Diffusion").

The price is that it does not reuse the denoiser's representations, so on little data a head on them
could be more accurate. The guide must share the denoiser's tokenizer (its gradients are per token id):
``check_tokenizer`` refuses any other.

Files of a guide folder: the Transformers model (``config.json``, weights), the tokenizer, and
``guide.json`` (labels, layout, the checkpoint it was trained beside, validation accuracy per masked fraction).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from textdiffusion.core.labels import LABEL_POSITION
from textdiffusion.errors import UsageError

GUIDE_FILE = "guide.json"


@dataclass
class GuideInfo:
    labels: list[str]
    label_slot: bool  # the checkpoint's rows hold a label token at position 1: the guide sees the mask there
    max_length: int
    checkpoint: str = "?"
    preset: str = "micro"
    accuracy: dict[str, float] = field(default_factory=dict)  # masked fraction -> validation accuracy


class NoisyClassifier:
    """A sequence classifier of noised blocks and the two things guidance asks of it: log p(y | x_t) for
    every row, and its first-order change for every (position, token) swap."""

    def __init__(self, model, tokenizer, info: GuideInfo, path: str = "?"):
        self.model, self.tokenizer, self.info, self.path = model.eval(), tokenizer, info, path
        self.mask_id = tokenizer.mask_token_id

    @property
    def labels(self) -> list[str]:
        return list(self.info.labels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- files ----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "NoisyClassifier":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path).expanduser()
        if not (folder / GUIDE_FILE).exists():
            raise UsageError(f"--guide {str(path)!r} is not a guide folder (no {GUIDE_FILE}): train one with "
                             "`textdiffusion train-guide`.", field="guide", value=str(path))
        info = GuideInfo(**json.loads((folder / GUIDE_FILE).read_text()))
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(model.to(device), tokenizer, info, str(path))

    def save(self, path: str | Path) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / GUIDE_FILE).write_text(json.dumps(asdict(self.info), indent=2) + "\n")

    # -- checks -----------------------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer, checkpoint: str) -> None:
        """Refuse a denoiser whose tokenizer is not the guide's (same tokens, same ids): one line naming both."""
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise UsageError(f"--guide {self.path!r} was trained with another tokenizer ({len(self.tokenizer)} tokens, "
                             f"beside {self.info.checkpoint!r}) than --checkpoint {checkpoint!r} ({len(tokenizer)} "
                             f"tokens); train the guide with `train-guide --checkpoint {checkpoint}`.",
                             field="guide", value=self.path)

    def label_index(self, label: str) -> int:
        if label not in self.info.labels:
            raise UsageError(f"--label {label!r} is not a label of the guide {self.path!r} (its labels: "
                             f"{self.labels}).", field="label", value=label)
        return self.info.labels.index(label)

    # -- what guidance asks ------------------------------------------------------------------------------
    def view(self, x: torch.Tensor) -> torch.Tensor:
        """[b, l] the rows as the guide was trained on them: a label token of the denoiser's row is masked
        (the guide must judge the text, not read its label)."""
        x = x.to(self.device)
        if self.info.label_slot and x.shape[1] > LABEL_POSITION:
            x = x.clone()
            x[:, LABEL_POSITION] = self.mask_id
        return x

    def logits(self, x: torch.Tensor, attention: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=self.view(x), attention_mask=_on(attention, self.device)).logits.float()  # [b, C]

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor, attention: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        """[b, C] log p(y | x_t) of every row."""
        with torch.inference_mode(False):
            out = [self.logits(x[s:s + batch_size].clone(), None if attention is None else attention[s:s + batch_size].clone())
                   for s in range(0, x.shape[0], batch_size)]
        return torch.cat(out).log_softmax(-1)

    def token_deltas(self, x: torch.Tensor, attention: torch.Tensor | None, y: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """[n, V]: for each of the ``positions`` ([b, l] bool, row-major) and every token v, the first-order
        change of log p(y | x) when that position's token becomes v (Taylor-approximated guidance):
        ``grad_e . (E[v] - E[x_pos])`` with ``grad_e`` the gradient of log p(y_row | x) with respect to the
        position's input embedding and ``E`` the embedding table. One forward and one backward for the batch."""
        with torch.inference_mode(False), torch.enable_grad():
            ids = self.view(x.clone())  # a normal tensor: an inference tensor cannot enter autograd
            table = self.model.get_input_embeddings().weight  # [V, d]
            embeds = table[ids].detach().requires_grad_(True)  # [b, l, d]
            logits = self.model(inputs_embeds=embeds, attention_mask=_on(attention, self.device)).logits.float()
            chosen = logits.log_softmax(-1).gather(1, y.to(self.device).clone()[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, embeds)  # [b, l, d]
        where = positions.to(self.device)
        g = grad[where].detach()  # [n, d]
        current = (g * table.detach()[ids[where]]).sum(-1, keepdim=True)  # [n, 1] grad . E[x_pos]
        return g @ table.detach().T - current  # [n, V]


def _on(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device).clone()


def load_guide(path: str | Path | None, device: torch.device | str = "cpu") -> NoisyClassifier | None:
    return None if path is None else NoisyClassifier.load(path, device)


def accuracy_table(levels: Sequence[float], accuracy: Sequence[float]) -> str:
    """One line: validation accuracy at each masked fraction."""
    return "  ".join(f"{level:.0%} masked: {acc:.3f}" for level, acc in zip(levels, accuracy))
